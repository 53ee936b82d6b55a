pub mod eval;
pub mod prepare;
pub mod train;
pub mod plot;
