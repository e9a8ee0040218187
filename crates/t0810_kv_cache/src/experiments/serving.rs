//! Section 3: a serving simulation, contiguous max-length reservation vs paged blocks of 1–128
//! tokens, on one workload of requests (metrics `serving`, figures `serving_waste.png` and
//! `serving_batch.png`); and prefix sharing, the blocks saved when 32 sequences share a
//! 512-token system prompt (`prefix_sharing`).

use super::{human_bytes, Env};
use anyhow::Result;
use shared::report::{bar_chart, print_table, RunReport};
use t0810_kv_cache::kv_cache_bytes;
use t0810_kv_cache::sim::{prefix_sharing_blocks, simulate, workload, Policy, SimResult};

fn label(policy: Policy) -> String {
    match policy {
        Policy::Contiguous => "contiguous (max_seq)".to_string(),
        Policy::Paged { block_size } => format!("paged, block {block_size}"),
    }
}

/// The policies on `n_req` requests (4 arriving per step) within `budget` token slots.
fn simulate_policies(env: &Env, max_seq: usize) -> Result<Vec<SimResult>> {
    let (n_req, budget) = if env.quick {
        (100, 32_768)
    } else {
        (400, 65_536)
    };
    let reqs = workload(n_req, 4, (16, 1024), (16, 1024), env.seed);
    let llama7b_slot = kv_cache_bytes(1, 32, 32, 1, 128, 2);
    println!("   {n_req} requests (4 per step; prompts and outputs uniform in 16..1024 tokens), max_seq {max_seq}, budget {budget} token slots (= {} of LLaMA-2-7B fp16 cache)", human_bytes(budget * llama7b_slot));
    let mut results = vec![simulate(&reqs, Policy::Contiguous, budget, max_seq)?];
    for block_size in [1, 8, 16, 32, 64, 128] {
        results.push(simulate(
            &reqs,
            Policy::Paged { block_size },
            budget,
            max_seq,
        )?);
    }
    Ok(results)
}

/// The table, the `serving` metric and the two bar charts.
fn record(env: &Env, results: &[SimResult], report: &mut RunReport) -> Result<()> {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                label(r.policy),
                format!("{:.1}", r.waste_pct),
                format!("{:.1}", r.mean_batch),
                r.max_batch.to_string(),
                r.steps.to_string(),
                format!("{:.1}", r.tokens_per_step),
                r.preemptions.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "policy",
            "waste %",
            "mean batch",
            "max batch",
            "steps",
            "tokens/step",
            "preemptions",
        ],
        &rows,
    );
    report.metric("serving", results);
    let labels: Vec<String> = rows
        .iter()
        .map(|r| {
            r[0].replace("paged, block ", "paged B=")
                .replace(" (max_seq)", "")
        })
        .collect();
    let out = &env.ctx.out_dir;
    let waste: Vec<f64> = results.iter().map(|r| r.waste_pct).collect();
    bar_chart(
        &out.join("serving_waste.png"),
        "KV memory reserved but unused (simulated serving)",
        "waste %",
        &labels,
        &waste,
    )?;
    let batch: Vec<f64> = results.iter().map(|r| r.mean_batch).collect();
    bar_chart(
        &out.join("serving_batch.png"),
        "Sequences running at once in the same memory",
        "mean batch",
        &labels,
        &batch,
    )?;
    Ok(())
}

/// 32 requests with a common 512-token system prompt and 64–256 tokens of their own, blocks of 16.
fn prefix_sharing(env: &Env, max_seq: usize, report: &mut RunReport) -> Result<()> {
    let own: Vec<usize> = workload(32, 32, (64, 256), (1, 1), env.seed + 1)
        .iter()
        .map(|r| r.prompt)
        .collect();
    let (without, with) = prefix_sharing_blocks(512, &own, 16, max_seq)?;
    let saving = 100.0 * (1.0 - with as f64 / without as f64);
    println!("   prefix sharing (32 sequences, 512-token shared prompt + 64..256 own, blocks of 16): {without} → {with} blocks ({saving:.1}% saved)");
    report.metric("prefix_sharing", serde_json::json!({ "sequences": 32, "prefix": 512, "block_size": 16, "blocks_without": without, "blocks_with": with, "saving_pct": saving }));
    Ok(())
}

/// Section 3.
pub fn run(env: &Env, report: &mut RunReport) -> Result<()> {
    println!("\n[3/3] serving simulation: contiguous max-length reservation vs paged blocks");
    let max_seq = 2048;
    let results = simulate_policies(env, max_seq)?;
    record(env, &results, report)?;
    prefix_sharing(env, max_seq, report)
}
