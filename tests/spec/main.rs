//! The specification of moe-router, one module per area.

#![allow(missing_docs)]

mod math;
