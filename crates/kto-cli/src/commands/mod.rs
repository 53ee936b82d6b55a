pub mod chat;
pub mod eval;
pub mod export;
pub mod generate;
pub mod model_source;
pub mod plot;
pub mod prepare;
pub mod train;
