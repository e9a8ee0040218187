//! # Embedding lookup: rows of a table, and the scatter-add that is its gradient
//!
//! A token embedding is a raw parameter table `E (vocab, d)`; looking a token up is reading its
//! row. Written as math,
//!
//! ```text
//! forward   out[i, :]  = E[ids[i], :]                          ids (n,) → out (n, d)
//! backward  dE[v, :]   = Σ_{i : ids[i] = v} dout[i, :]         a scatter-add into (vocab, d)
//! ```
//!
//! Candle can do both (`index_select`, whose backward is `index_add`), and on the CPU that is
//! what a loop does anyway. On the GPU, though, Candle's `index_add` kernel gives one thread to
//! each of the `d` columns and walks all `n` ids in sequence: for a 64 × 256-token batch and
//! `d = 512`, 512 threads take 16,384 dependent steps each. [`embedding`] is a Candle custom op
//! with the same values and gradients whose CUDA backward gives every `(token, column)` pair its
//! own thread and adds rows with fp32 atomics (`kernels/embedding.cu`, `cuda` feature only).
//!
//! Every topic's model looks its tokens up through [`embedding`]. For side-by-side measurements,
//! [`embedding_with`] and [`Lookup::IndexSelect`] (a field of the run's
//! [`crate::kernels::Kernels`]) use Candle's `index_select` instead (same values).

use crate::custom_op::contiguous_slice;
use crate::kernels::Lookup;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

/// Rows of `table (vocab, d)` picked by `ids` (any shape, any integer dtype): returns
/// `ids.shape + (d,)` in the table's dtype. Differentiable in `table`. An id ≥ vocab is an error
/// on the CPU; on the GPU its row is zero (the check would cost a device synchronisation).
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    embedding_with(table, ids, Lookup::Gather)
}

/// [`embedding`] with the lookup chosen by `how`.
pub fn embedding_with(table: &Tensor, ids: &Tensor, how: Lookup) -> Result<Tensor> {
    let (vocab, d) = table.dims2().map_err(|_| {
        candle_core::Error::Msg(format!(
            "embedding: the table must be (vocab, d), got {:?}",
            table.dims()
        ))
    })?;
    if !ids.dtype().is_int() {
        bail!("embedding: ids must be integers, got {:?}", ids.dtype());
    }
    if table.device().location() != ids.device().location() {
        bail!(
            "embedding: the table is on {:?}, the ids on {:?}",
            table.device().location(),
            ids.device().location()
        );
    }
    let mut out_dims = ids.dims().to_vec();
    out_dims.push(d);
    let flat = ids.flatten_all()?.to_dtype(DType::U32)?.contiguous()?;
    if how == Lookup::IndexSelect {
        return table.index_select(&flat, 0)?.reshape(out_dims);
    }
    table
        .contiguous()?
        .apply_op2(&flat, Embedding { vocab, d })?
        .reshape(out_dims)
}

/// The gather `(table (vocab, d), ids (n,) u32) → (n, d)`; its `bwd` is [`EmbeddingBackward`].
#[derive(Debug, Clone, Copy)]
struct Embedding {
    vocab: usize,
    d: usize,
}

/// The scatter-add `(dout (n, d), ids (n,) u32) → dtable (vocab, d)`. No backward of its own.
#[derive(Debug, Clone, Copy)]
struct EmbeddingBackward {
    vocab: usize,
    d: usize,
}

/// The ids as `usize`, each checked against the vocabulary.
fn cpu_ids(s: &CpuStorage, l: &Layout, vocab: usize) -> Result<Vec<usize>> {
    let ids = contiguous_slice(s.as_slice::<u32>()?, l, "embedding: ids")?;
    ids.iter()
        .map(|&i| {
            if (i as usize) < vocab {
                Ok(i as usize)
            } else {
                bail!("embedding: token id {i} is outside the table's {vocab} rows")
            }
        })
        .collect()
}

fn cpu_gather<T: WithDType>(table: &[T], ids: &[usize], d: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(ids.len() * d);
    for &i in ids {
        out.extend_from_slice(&table[i * d..(i + 1) * d]);
    }
    out
}

/// `dE[v] = Σ dout[i]` over the rows `i` with `ids[i] = v`, summed in f64, rounded once.
fn cpu_scatter_add<T: WithDType>(dout: &[T], ids: &[usize], vocab: usize, d: usize) -> Vec<T> {
    let mut acc = vec![0f64; vocab * d];
    for (row, &i) in dout.chunks_exact(d).zip(ids) {
        for (a, &g) in acc[i * d..(i + 1) * d].iter_mut().zip(row) {
            *a += g.to_f64();
        }
    }
    acc.into_iter().map(T::from_f64).collect()
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ids = cpu_ids(s2, l2, self.vocab)?;
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_gather(
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "embedding: table")?,
                    &ids,
                    self.d,
                ))
            };
        }
        let out = crate::for_float_dtype!(s1.dtype(), "embedding", run);
        Ok((out, Shape::from((ids.len(), self.d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l2.shape().elem_count();
        let out = cuda::gather(s1, l1, s2, l2, n, self.d, self.vocab)?;
        Ok((out, Shape::from((n, self.d))))
    }

    fn bwd(
        &self,
        _table: &Tensor,
        ids: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let back = EmbeddingBackward {
            vocab: self.vocab,
            d: self.d,
        };
        Ok((Some(dout.contiguous()?.apply_op2_no_bwd(ids, &back)?), None))
    }
}

impl CustomOp2 for EmbeddingBackward {
    fn name(&self) -> &'static str {
        "embedding-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ids = cpu_ids(s2, l2, self.vocab)?;
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                <$t>::to_cpu_storage_owned(cpu_scatter_add(
                    contiguous_slice(s1.as_slice::<$t>()?, l1, "embedding: gradient")?,
                    &ids,
                    self.vocab,
                    self.d,
                ))
            };
        }
        let out = crate::for_float_dtype!(s1.dtype(), "embedding backward", run);
        Ok((out, Shape::from((self.vocab, self.d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n = l2.shape().elem_count();
        let out = cuda::scatter_add(s1, l1, s2, l2, n, self.d, self.vocab)?;
        Ok((out, Shape::from((self.vocab, self.d))))
    }
}

/// Launching `kernels/embedding.cu`.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{contiguous_view, load_kernel};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage};
    use half::{bf16, f16};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/embedding.ptx"));
    const MODULE: &str = "shared_embedding";
    use crate::cuda::THREADS;

    fn suffix(dtype: DType) -> Result<&'static str> {
        use DType::*;
        crate::cuda::dtype_suffix(dtype, &[F32, F64, BF16, F16], "embedding")
    }

    pub fn gather(
        st: &CudaStorage,
        lt: &Layout,
        si: &CudaStorage,
        li: &Layout,
        n: usize,
        d: usize,
        vocab: usize,
    ) -> Result<CudaStorage> {
        macro_rules! run {
            ($t:ty, $_a:ty) => {
                gather_t::<$t>(st, lt, si, li, n, d, vocab)
            };
        }
        crate::for_float_dtype!(st.dtype(), "embedding (cuda)", run)
    }

    fn gather_t<T: CudaDType + DeviceRepr>(
        st: &CudaStorage,
        lt: &Layout,
        si: &CudaStorage,
        li: &Layout,
        n: usize,
        d: usize,
        vocab: usize,
    ) -> Result<CudaStorage> {
        let dev = st.device().clone();
        let (table, _) = contiguous_view::<T>(st, lt, "embedding (cuda): table")?;
        let (ids, _) = contiguous_view::<u32>(si, li, "embedding (cuda): ids")?;
        // SAFETY: the kernel writes every element (zeros for out-of-range ids).
        let mut out = unsafe { dev.alloc::<T>(n * d)? };
        if n > 0 && d > 0 {
            let func = load_kernel(
                &dev,
                MODULE,
                PTX,
                &format!("embedding_fwd_{}", suffix(st.dtype())?),
                0,
            )?;
            let cfg = LaunchConfig {
                grid_dim: (n.min(65_535) as u32, 1, 1),
                block_dim: (THREADS.min(d as u32).max(32), 1, 1),
                shared_mem_bytes: 0,
            };
            let (n_i, d_i, v_i) = (n as i64, d as i64, vocab as i64);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&table)
                .arg(&ids)
                .arg(&mut out)
                .arg(&n_i)
                .arg(&d_i)
                .arg(&v_i);
            // SAFETY: argument types match the kernel; out holds n·d elements.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub fn scatter_add(
        sg: &CudaStorage,
        lg: &Layout,
        si: &CudaStorage,
        li: &Layout,
        n: usize,
        d: usize,
        vocab: usize,
    ) -> Result<CudaStorage> {
        let dev = sg.device().clone();
        let (ids, _) = contiguous_view::<u32>(si, li, "embedding backward (cuda): ids")?;
        let what = "embedding backward (cuda): dout";
        // Accumulate in the output itself for f32/f64, in an f32 buffer for bf16/f16.
        match sg.dtype() {
            DType::F32 => {
                let (dout, _) = contiguous_view::<f32>(sg, lg, what)?;
                let mut acc = dev.alloc_zeros::<f32>(vocab * d)?;
                scatter_into(&dev, "f32", &dout, &ids, &mut acc, n, d, vocab)?;
                Ok(CudaStorage::wrap_cuda_slice(acc, dev))
            }
            DType::F64 => {
                let (dout, _) = contiguous_view::<f64>(sg, lg, what)?;
                let mut acc = dev.alloc_zeros::<f64>(vocab * d)?;
                scatter_into(&dev, "f64", &dout, &ids, &mut acc, n, d, vocab)?;
                Ok(CudaStorage::wrap_cuda_slice(acc, dev))
            }
            DType::BF16 => {
                let (dout, _) = contiguous_view::<bf16>(sg, lg, what)?;
                let mut acc = dev.alloc_zeros::<f32>(vocab * d)?;
                scatter_into(&dev, "bf16", &dout, &ids, &mut acc, n, d, vocab)?;
                cast::<bf16>(&dev, &acc, "bf16")
            }
            DType::F16 => {
                let (dout, _) = contiguous_view::<f16>(sg, lg, what)?;
                let mut acc = dev.alloc_zeros::<f32>(vocab * d)?;
                scatter_into(&dev, "f16", &dout, &ids, &mut acc, n, d, vocab)?;
                cast::<f16>(&dev, &acc, "f16")
            }
            dt => bail!("embedding backward (cuda): dtype {dt:?} not supported"),
        }
    }

    /// `acc[ids[i], :] += dout[i, :]` with `embedding_bwd_<name>`.
    #[allow(clippy::too_many_arguments)]
    fn scatter_into<T: DeviceRepr, A: DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        dout: &CudaView<'_, T>,
        ids: &CudaView<'_, u32>,
        acc: &mut CudaSlice<A>,
        n: usize,
        d: usize,
        vocab: usize,
    ) -> Result<()> {
        if n == 0 || d == 0 {
            return Ok(());
        }
        let func = load_kernel(dev, MODULE, PTX, &format!("embedding_bwd_{name}"), 0)?;
        let cfg = crate::cuda::grid_stride(n * d);
        let (n_i, d_i, v_i) = (n as i64, d as i64, vocab as i64);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(dout).arg(ids).arg(acc).arg(&n_i).arg(&d_i).arg(&v_i);
        // SAFETY: argument types match the kernel; acc holds vocab·d elements.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// The fp32 accumulator rounded once to `T`.
    fn cast<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        acc: &CudaSlice<f32>,
        name: &str,
    ) -> Result<CudaStorage> {
        let count = acc.len();
        // SAFETY: the cast kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(count)? };
        if count > 0 {
            let func = load_kernel(dev, MODULE, PTX, &format!("embedding_cast_{name}"), 0)?;
            let cfg = crate::cuda::grid_stride(count);
            let count_i = count as i64;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(acc).arg(&mut out).arg(&count_i);
            // SAFETY: acc and out both hold `count` elements.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Ids with repeats (token 3 four times) and every row of a small table touched or not.
    fn ids(dev: &Device) -> Result<Tensor> {
        Tensor::new(&[[3u32, 0, 3, 7], [3, 1, 3, 6]], dev)
    }

    #[test]
    fn values_and_gradient_equal_index_select() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let table =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 5), &dev)?.to_dtype(dtype)?)?;
            let ids = ids(&dev)?;
            let dout = Tensor::randn(0f32, 1.0, (2, 4, 5), &dev)?.to_dtype(dtype)?;
            let ours = embedding(table.as_tensor(), &ids)?;
            let want = table
                .as_tensor()
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((2, 4, 5))?;
            assert_eq!(ours.dims(), &[2, 4, 5]);
            let diff = (&ours - &want)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "{dtype:?}: a gather must copy exactly");
            let g_ours = (ours * &dout)?.sum_all()?.backward()?;
            let g_want = (want * &dout)?.sum_all()?.backward()?;
            let (a, b) = (
                g_ours.get(table.as_tensor()).unwrap(),
                g_want.get(table.as_tensor()).unwrap(),
            );
            let diff = (a - b)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            assert!(diff < 1e-6, "{dtype:?}: gradient differs by {diff}");
            // Row 3 was looked up four times: its gradient is the sum of four rows of dout.
            let row3: f64 = a.get(3)?.sum_all()?.to_dtype(DType::F64)?.to_scalar()?;
            let picked = dout
                .flatten_to(1)?
                .index_select(&Tensor::new(&[0u32, 2, 4, 6], &dev)?, 0)?;
            let want3: f64 = picked.sum_all()?.to_dtype(DType::F64)?.to_scalar()?;
            assert!((row3 - want3).abs() < 1e-5, "{row3} vs {want3}");
            // Rows never looked up get no gradient.
            let row8: f64 = a
                .get(8)?
                .abs()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar()?;
            assert_eq!(row8, 0.0);
        }
        Ok(())
    }

    #[test]
    fn bad_inputs_are_clear_errors() -> Result<()> {
        let dev = Device::Cpu;
        let table = Tensor::zeros((4, 3), DType::F32, &dev)?;
        let err = embedding(&table, &Tensor::new(&[1u32, 4], &dev)?).unwrap_err();
        assert!(
            err.to_string()
                .contains("token id 4 is outside the table's 4 rows"),
            "{err}"
        );
        let err = embedding(&table.flatten_all()?, &Tensor::new(&[1u32], &dev)?).unwrap_err();
        assert!(err.to_string().contains("(vocab, d)"), "{err}");
        let err = embedding(&table, &Tensor::new(&[1f32], &dev)?).unwrap_err();
        assert!(err.to_string().contains("integers"), "{err}");
        // i64 ids are accepted and give the same rows as u32 ones.
        let t = Tensor::arange(0f32, 12.0, &dev)?.reshape((4, 3))?;
        let a = embedding(&t, &Tensor::new(&[2i64, 0], &dev)?)?;
        let b = embedding(&t, &Tensor::new(&[2u32, 0], &dev)?)?;
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        assert_eq!(
            a.to_vec2::<f32>()?,
            vec![vec![6.0, 7.0, 8.0], vec![0.0, 1.0, 2.0]]
        );
        Ok(())
    }
}
