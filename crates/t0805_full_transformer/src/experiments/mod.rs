//! The experiment of 8-05, in the order it runs: the continuation pairs ([`data`]), the two
//! contenders behind one interface ([`model`]), each trained through the one training loop
//! ([`training`]) and compared side by side ([`comparison`]), with greedy samples ([`samples`]).

pub mod comparison;
pub mod data;
pub mod model;
pub mod samples;
pub mod training;
