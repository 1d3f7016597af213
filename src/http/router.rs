//! Location lookup: `exact` beats the longest `prefix`, as in nginx.
//!
//! Lookup cost does not grow with the number of locations: exact paths are
//! a hash map, prefixes a byte trie walked once along the request path, so a
//! request costs O(path length) whatever the config holds.
//!
//! Prefixes match by characters, like nginx's `location /api` (which also
//! matches `/apis`): users port nginx layouts such as `/v0/management/usage*`
//! verbatim. Write the prefix with a trailing `/` to match whole segments.

use std::collections::HashMap;

/// A compiled set of locations; values are indexes into the site's list.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, usize>,
    trie: Vec<Node>,
}

#[derive(Debug, Default)]
struct Node {
    /// Sorted by byte for binary search.
    children: Vec<(u8, u32)>,
    location: Option<usize>,
}

impl Router {
    /// Build from (path, is_exact) pairs in config order; the index of each
    /// pair is what `find` returns.
    pub fn new<'a>(locations: impl IntoIterator<Item = (&'a str, bool)>) -> Router {
        let mut r = Router {
            exact: HashMap::new(),
            trie: vec![Node::default()],
        };
        for (i, (path, exact)) in locations.into_iter().enumerate() {
            if exact {
                r.exact.entry(path.to_string()).or_insert(i);
            } else {
                let mut node = 0usize;
                for &b in path.as_bytes() {
                    node = match r.trie[node].children.binary_search_by_key(&b, |c| c.0) {
                        Ok(pos) => r.trie[node].children[pos].1 as usize,
                        Err(pos) => {
                            let next = r.trie.len();
                            r.trie.push(Node::default());
                            r.trie[node].children.insert(pos, (b, next as u32));
                            next
                        }
                    };
                }
                if r.trie[node].location.is_none() {
                    r.trie[node].location = Some(i);
                }
            }
        }
        r
    }

    /// The location for a request path (without query).
    pub fn find(&self, path: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(path) {
            return Some(i);
        }
        let mut node = 0usize;
        let mut best = self.trie[0].location;
        for &b in path.as_bytes() {
            match self.trie[node].children.binary_search_by_key(&b, |c| c.0) {
                Ok(pos) => {
                    node = self.trie[node].children[pos].1 as usize;
                    if let Some(l) = self.trie[node].location {
                        best = Some(l);
                    }
                }
                Err(_) => break,
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpa() -> Router {
        Router::new([
            ("/v1/responses", true),         // 0
            ("/health", true),               // 1
            ("/usage-service/", false),      // 2
            ("/v0/management/usage", false), // 3
            ("/v0/management/", false),      // 4
            ("/", false),                    // 5
            ("/v1/", false),                 // 6
        ])
    }

    #[test]
    fn exact_beats_longest_prefix() {
        let r = cpa();
        assert_eq!(r.find("/v1/responses"), Some(0));
        assert_eq!(r.find("/v1/responses/x"), Some(6));
        assert_eq!(r.find("/v1/chat/completions"), Some(6));
        assert_eq!(r.find("/health"), Some(1));
        assert_eq!(r.find("/healthz"), Some(5));
    }

    #[test]
    fn longest_prefix_wins_by_characters() {
        let r = cpa();
        assert_eq!(r.find("/v0/management/usage"), Some(3));
        assert_eq!(r.find("/v0/management/usage-statistics"), Some(3));
        assert_eq!(r.find("/v0/management/config"), Some(4));
        assert_eq!(r.find("/usage-service/api"), Some(2));
        assert_eq!(r.find("/usage-service"), Some(5));
        assert_eq!(r.find("/"), Some(5));
    }

    #[test]
    fn no_root_means_none() {
        let r = Router::new([("/api/", false), ("/x", true)]);
        assert_eq!(r.find("/"), None);
        assert_eq!(r.find("/ap"), None);
        assert_eq!(r.find("/api/v1"), Some(0));
        assert_eq!(r.find("/x/"), None);
    }

    #[test]
    fn many_locations_still_right() {
        let paths: Vec<String> = (0..5000).map(|i| format!("/svc{i}/")).collect();
        let r = Router::new(paths.iter().map(|p| (p.as_str(), false)));
        assert_eq!(r.find("/svc4321/deep/path"), Some(4321));
        assert_eq!(r.find("/svc43/x"), Some(43));
        assert_eq!(r.find("/svc"), None);
    }
}
