//! One module per `effir` subcommand.

pub mod embed;
pub mod eval;
pub mod inspect;
pub mod model_options;
