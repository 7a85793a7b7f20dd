//! Importers: build a [`RouterConfig`](crate::RouterConfig) from a Hugging Face `config.json`
//! ([`hf`]), from Megatron-Core `TransformerConfig` option names ([`megatron`]), or by the name of
//! a published model ([`presets`]).

pub mod hf;
pub mod megatron;
pub mod presets;

pub use hf::{
    BIAS_TENSOR, HfImport, HfMoeLayers, SUPPORTED_MODEL_TYPES, hf_moe_layers, hf_moe_layers_value, import_hf,
    import_hf_value,
};
pub use presets::{preset, preset_expects_expert_bias, preset_hf_config, preset_names};

/// Edit distance (insertions, deletions, substitutions) between two strings, by characters.
pub(crate) fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The entry of `known` nearest to `key` by edit distance (the first of equals); `None` when
/// `known` is empty.
pub(crate) fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known.iter().copied().min_by_key(|k| levenshtein(key, k))
}

#[cfg(test)]
mod tests {
    use super::{levenshtein, nearest};

    #[test]
    fn levenshtein_counts_insertions_deletions_and_substitutions() {
        assert_eq!(levenshtein("", ""), 0);
        assert_eq!(levenshtein("abc", ""), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("functon", "function"), 1);
        assert_eq!(levenshtein("same", "same"), 0);
    }

    #[test]
    fn nearest_picks_the_smallest_distance_and_the_first_of_equals() {
        assert_eq!(
            nearest("moe_router_topc", &["moe_router_dtype", "moe_router_topk"]),
            Some("moe_router_topk")
        );
        assert_eq!(nearest("ab", &["ax", "xb"]), Some("ax"));
        assert_eq!(nearest("x", &[]), None);
    }
}
