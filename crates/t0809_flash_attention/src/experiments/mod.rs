//! The experiments of topic 8-09, one module each.
//!
//! The default CPU run is a [`lesson::Lesson`] (one `results.json`) that three experiments add
//! to in turn: [`correctness`], [`memory`] and [`cpu_timing`]. The GPU benchmark and the
//! redrawing of its plots are [`bench`]. What more than one experiment needs (random inputs,
//! the error metric, median timings, byte formatting, the counting allocator) is in [`common`].

pub mod bench;
pub mod common;
pub mod correctness;
pub mod cpu_timing;
pub mod lesson;
pub mod memory;

/// The topic name: the output folder `<out>/t0809_flash_attention/` and the report's topic.
pub const TOPIC: &str = "t0809_flash_attention";
