//! Draws a small labelled heatmap (a smoke test of the plotting helpers).
fn main() -> anyhow::Result<()> {
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
    Ok(())
}
