//! KTO training.
