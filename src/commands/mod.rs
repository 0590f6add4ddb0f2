//! One module per `effir` subcommand.

pub mod analyze;
pub mod drop_study;
pub mod embed;
pub mod eval;
pub mod inspect;
pub mod model_options;
pub mod prune;
