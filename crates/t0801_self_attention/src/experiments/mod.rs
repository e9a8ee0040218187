//! The experiments of the 8-01 binary, one module each, in the order `main` runs them.
//!
//! Each experiment prints its tables, writes its figures and its entry of `results.json`, and
//! returns the few numbers that the closing summary quotes.

pub mod causal_maps;
pub mod cost_vs_d;
pub mod cost_vs_n;
pub mod dictionary_lookup;

mod common;
mod dictionaries;
mod noise_sweep;
mod timing;

pub use timing::CostPlan;

use shared::report::print_table;

/// The closing `quantity | value` table, filled by the experiments as they finish.
#[derive(Default)]
pub struct Summary(Vec<Vec<String>>);

impl Summary {
    /// Appends one row.
    pub fn row(&mut self, quantity: &str, value: String) {
        self.0.push(vec![quantity.into(), value]);
    }

    /// Prints the table under a heading that names the device.
    pub fn print(&self, device: &str) {
        println!("\n== summary ({device})");
        print_table(&["quantity", "value"], &self.0);
    }
}
