//! Data-parallel training of the ladder's LM on the CPU, ranks as threads (`LocalGroup`) and as
//! processes (`TcpGroup`, started by `shared::process_group::launch`): a world of N, each rank on
//! its N-th of every batch and started from rank 0's parameters by a broadcast, trains as one
//! worker on the whole batch (`shared::train::train_lm_in_group` against `train_lm`).

use anyhow::Result;
use candle_core::{DType, Device};
use shared::data_parallel::{broadcast_parameters, Collective, LocalGroup};
use shared::train::{
    train_lm, train_lm_in_group, AdamWConfig, LmData, LmTrainSpec, ScheduleConfig, Trainer,
};
use t0804_transformer_block::{init_lm, LmShape};

const SHAPE: LmShape = LmShape {
    vocab_size: 53,
    max_seq_len: 32,
    d_model: 32,
    n_layers: 2,
    n_heads: 4,
};

fn spec() -> LmTrainSpec {
    LmTrainSpec {
        label: "dp".into(),
        steps: 6,
        batch_size: 8,
        seq_len: 16,
        eval_every: 3,
        eval_batches: 1,
        seed: 5,
        patience: None,
    }
}

fn trainer(varmap: &candle_nn::VarMap) -> Result<Trainer> {
    let schedule = ScheduleConfig {
        max_lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        total_steps: 6,
        clip_norm: Some(0.5),
    };
    Trainer::new(varmap, AdamWConfig::default(), schedule)
}

fn tokens(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 31 + i / 7 + salt) % SHAPE.vocab_size) as u32)
        .collect()
}

/// Trains a LLaMA rung initialised with `seed`, in `group` (or alone), and returns its
/// parameters and final validation loss.
fn run(seed: u64, group: Option<&dyn Collective>) -> Result<(Vec<f32>, f64)> {
    let (varmap, lm) = {
        // Models are initialised from the process-wide seeded generator: one at a time.
        let _one = shared::params::init_turn();
        shared::params::set_seed(seed);
        let cfg = t0808_rope::llama(SHAPE, 2);
        let parts = t0809_flash_attention::parts(shared::kernels::Kernels::fused());
        init_lm(&cfg, &parts, DType::F32, &Device::Cpu)?
    };
    let vars = shared::params::named_vars(&varmap);
    let (train, valid) = (tokens(3000, 0), tokens(600, 3));
    let loss_fn = |x: &candle_core::Tensor, y: &candle_core::Tensor| lm.loss(x, y);
    let mut t = trainer(&varmap)?;
    let curve = match group {
        Some(g) => {
            broadcast_parameters(&vars, g, 0)?;
            let data = LmData {
                train_tokens: &train,
                valid_tokens: &valid,
                device: &Device::Cpu,
                loss_fn: &loss_fn,
            };
            train_lm_in_group(&mut t, &data, &spec(), g)?
        }
        None => train_lm(&mut t, &train, &valid, &spec(), &Device::Cpu, &loss_fn)?,
    };
    let mut values = Vec::new();
    for (_, v) in vars {
        values.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((values, curve.valid.last().map_or(f64::NAN, |v| v.1)))
}

#[test]
fn a_world_of_n_trains_the_lm_as_one_worker_on_the_whole_batch() -> Result<()> {
    let (want, want_valid) = run(11, None)?;
    for world in [2, 4] {
        let groups = LocalGroup::new(world)?;
        // Every rank but 0 starts elsewhere: the broadcast must bring it to rank 0's parameters.
        let ranks: Vec<(Vec<f32>, f64)> = std::thread::scope(|scope| {
            let handles: Vec<_> = groups
                .into_iter()
                .map(|g| scope.spawn(move || run(11 + g.rank() as u64 * 100, Some(&g))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect::<Result<Vec<_>>>()
        })?;
        let diff = ranks[0]
            .0
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "world {world}: {diff:e} from one worker");
        assert!(
            (ranks[0].1 - want_valid).abs() < 1e-5,
            "world {world}: valid loss"
        );
        for (r, rank) in ranks.iter().enumerate().skip(1) {
            assert_eq!(
                rank.0, ranks[0].0,
                "world {world}: rank {r} differs from rank 0"
            );
        }
    }
    Ok(())
}

/// Where a child rank 0 of the process test writes its parameters and validation loss.
const PARAMS_OUT: &str = "MODULE08_TEST_PARAMS_OUT";

/// Ranks as processes: this test executable started twice by `launch`, each copy joining the
/// group from its environment (`TcpGroup::from_env`) and training its half of every batch; rank 0
/// writes what it ends with, which must be what one worker on the whole batch ends with.
#[test]
fn two_processes_train_the_lm_as_one_worker_on_the_whole_batch() -> Result<()> {
    use shared::process_group::{free_local_address, launch, TcpGroup};
    if let Some(group) = TcpGroup::from_env()? {
        // One rank of the launched world: start elsewhere, as the thread test does.
        let (values, valid) = run(11 + group.rank() as u64 * 100, Some(&group))?;
        if group.rank() == 0 {
            let mut bytes: Vec<u8> = valid.to_le_bytes().to_vec();
            bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            std::fs::write(std::env::var(PARAMS_OUT)?, bytes)?;
        }
        return Ok(());
    }
    let (want, want_valid) = run(11, None)?;
    let out = std::env::temp_dir().join(format!("module08-dp-{}.bin", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let name = "two_processes_train_the_lm_as_one_worker_on_the_whole_batch";
    let args: Vec<String> = [name, "--exact", "--test-threads", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    launch(
        2,
        &free_local_address()?,
        &std::env::current_exe()?,
        &args,
        &[(PARAMS_OUT, out.display().to_string())],
    )?;
    let bytes = std::fs::read(&out)?;
    std::fs::remove_file(&out)?;
    let valid = f64::from_le_bytes(bytes[..8].try_into()?);
    let values: Vec<f32> = bytes[8..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    assert_eq!(values.len(), want.len(), "rank 0 wrote every parameter");
    let diff = values
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "two processes: {diff:e} from one worker");
    assert!(
        (valid - want_valid).abs() < 1e-5,
        "two processes: valid loss {valid} vs {want_valid}"
    );
    Ok(())
}

/// `train-bench` as a launched group of two processes: rank 0 reports the group (every rank's
/// tokens, `world` 2 in `results.json`), and a phase-by-phase profile, which runs in one process,
/// is refused in a group with an error that reaches the launcher.
#[test]
fn train_bench_runs_as_a_group_and_reports_the_whole_group() -> Result<()> {
    use shared::process_group::{free_local_address, launch};
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_t0810_kv_cache"));
    if !bench.exists() {
        // A test executable carried to another machine (scripts/gpu-build.sh) without the binary.
        println!("train-bench binary not at {}: skipped", bench.display());
        return Ok(());
    }
    let out = std::env::temp_dir().join(format!("dp-train-bench-{}", std::process::id()));
    let args = |extra: &[&str]| -> Vec<String> {
        let base = [
            "--device",
            "cpu",
            "--out",
            &out.display().to_string(),
            "train-bench",
            "--vocab",
            "64",
            "--ctx",
            "16",
            "--d-model",
            "32",
            "--d-ff",
            "64",
            "--layers",
            "1",
            "--heads",
            "4",
            "--kv-heads",
            "4",
            "--batch",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
        ]
        .map(String::from);
        base.into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    launch(2, &free_local_address()?, bench, &args(&[]), &[])?;
    let path = out.join("t0810_kv_cache/train_bench/results.json");
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    std::fs::remove_dir_all(&out)?;
    assert_eq!(results["config"]["world"], 2, "{results}");
    assert_eq!(results["metrics"]["bench.world"], 2, "{results}");
    let tps = results["metrics"]["bench.tokens_per_s"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(tps.is_finite() && tps > 0.0, "tokens/s {tps}");
    // Every rank refuses (the message itself is checked by train_bench's unit test).
    let err = launch(2, &free_local_address()?, bench, &args(&["--profile"]), &[])
        .expect_err("--profile in a group must fail");
    assert!(
        err.to_string().contains("rank 0") && err.to_string().contains("rank 1"),
        "{err:#}"
    );
    Ok(())
}
