//! The experiments of 8-04, one module each: the gradient reaching each block at initialisation
//! ([`grad_at_init`]) and pre- vs post-norm training at two learning-rate regimes ([`regimes`]),
//! on the model of [`model`].

pub mod grad_at_init;
pub mod model;
pub mod regimes;
