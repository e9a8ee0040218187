//! NCCL on the GPU (`--features nccl`, on the GPU host): a world of one rank, where every
//! collective must return its input and a data-parallel step must equal a plain step. (Several
//! ranks need several processes and GPUs.) Without the feature this file has no tests.
#![cfg(feature = "nccl")]

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use shared::data_parallel::Collective;
use shared::nccl::NcclGroup;
use shared::train::{AdamWConfig, ScheduleConfig, Trainer};

fn device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) if std::env::var_os("MODULE08_EXPECT_GPU").is_none() => {
            println!("no GPU ({e}): skipped");
            None
        }
        Err(e) => panic!("MODULE08_EXPECT_GPU is set but no GPU opened: {e}"),
    }
}

#[test]
fn a_world_of_one_returns_its_input_and_steps_as_a_plain_step() -> Result<()> {
    let Some(dev) = device() else { return Ok(()) };
    let group = NcclGroup::join(&dev, 0, 1, NcclGroup::new_id()?)?;
    let t = Tensor::arange(0f32, 1000., &dev)?.reshape((10, 100))?;
    assert_eq!(
        group.all_reduce_sum(&t)?.to_vec2::<f32>()?,
        t.to_vec2::<f32>()?
    );
    assert_eq!(
        group.broadcast(&t, 0)?.to_vec2::<f32>()?,
        t.to_vec2::<f32>()?
    );
    assert!(group.broadcast(&t, 1).is_err());
    assert!(group.all_reduce_sum(&t.to_dtype(DType::BF16)?).is_err());
    // The same model twice; one steps plainly, the other through the group.
    let schedule = ScheduleConfig {
        max_lr: 1e-2,
        min_lr: 1e-2,
        warmup_steps: 0,
        total_steps: 3,
        clip_norm: Some(1.0),
    };
    let mut params = Vec::new();
    for through_group in [false, true] {
        shared::params::set_seed(9);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let w = shared::params::weight(&vb, 4, 8, "w")?;
        let mut trainer = Trainer::new(&varmap, AdamWConfig::default(), schedule.clone())?;
        for step in 0..3 {
            let x = Tensor::ones((16, 8), DType::F32, &dev)?.affine(step as f64 + 1.0, 0.0)?;
            let loss = shared::linear(&x, &w)?.sqr()?.mean_all()?;
            if through_group {
                trainer.step_data_parallel(&loss, &group)?;
            } else {
                trainer.step(&loss)?;
            }
        }
        params.push(w.flatten_all()?.to_vec1::<f32>()?);
    }
    assert_eq!(params[0], params[1]);
    Ok(())
}
