//! How the tests compare tensors: the largest absolute difference, as one `f64`.

use candle_core::{DType, Result, Tensor};

/// `max |a − b|` over every element (any shape, any float dtype), in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_largest_difference_whatever_the_shape_and_sign() -> Result<()> {
        let a = Tensor::new(&[[1f32, -2.0], [3.0, 4.0]], &Device::Cpu)?;
        let b = Tensor::new(&[[1f32, 0.5], [3.0, 4.25]], &Device::Cpu)?;
        assert_eq!(max_abs_diff(&a, &b)?, 2.5);
        assert_eq!(max_abs_diff(&a, &a)?, 0.0);
        Ok(())
    }
}
