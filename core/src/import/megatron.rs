//! Megatron-Core `TransformerConfig` import (work in progress).
