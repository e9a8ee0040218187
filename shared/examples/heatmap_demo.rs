//! Draws a small labelled heatmap and a line chart (a smoke test of the plotting helpers).
fn main() -> anyhow::Result<()> {
    shared::cpu::in_pool(run)
}

fn run() -> anyhow::Result<()> {
    let m: Vec<Vec<f64>> = (0..4)
        .map(|r| {
            (0..5)
                .map(|c| if c == r { 1.0 } else { 0.1 * c as f64 })
                .collect()
        })
        .collect();
    let xs: Vec<String> = (0..5).map(|i| format!("k{i}")).collect();
    let ys: Vec<String> = (0..4).map(|i| format!("q{i}")).collect();
    let out = std::env::temp_dir().join("heatmap_demo.png");
    shared::report::heatmap(
        &out,
        "demo: row i peaks at column i",
        "key",
        "query",
        &m,
        Some((&xs, &ys)),
    )?;
    println!("{}", out.display());
    let narrow = shared::report::Series::new(
        "per block",
        (0..12)
            .map(|i| (i as f64, 0.4 - 0.018 * i as f64))
            .collect(),
    );
    let out2 = std::env::temp_dir().join("line_demo.png");
    shared::report::line_chart(
        &out2,
        "narrow log range falls back to linear",
        "block",
        "norm",
        &[narrow],
        shared::report::Axes {
            log_x: false,
            log_y: true,
        },
    )?;
    println!("{}", out2.display());
    Ok(())
}
