//! Topic matching as RabbitMQ does it: words split on `.`, `*` is exactly one word, `#` is
//! zero or more words. An empty key has zero words.

/// Split a routing or binding key into words (`""` has none, `"a."` has `a` and ``).
pub fn words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

/// A binding key compiled once for repeated matching.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPattern {
    words: Vec<Word>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Word {
    Literal(String),
    Star,
    Hash,
}

impl TopicPattern {
    /// Compile a binding key.
    pub fn new(binding_key: &str) -> Self {
        let mut out: Vec<Word> = Vec::new();
        for w in words(binding_key) {
            let word = match w {
                "*" => Word::Star,
                "#" => Word::Hash,
                other => Word::Literal(other.to_string()),
            };
            // Consecutive `#` match exactly what one `#` matches.
            if word == Word::Hash && out.last() == Some(&Word::Hash) {
                continue;
            }
            out.push(word);
        }
        TopicPattern { words: out }
    }

    /// Whether `routing_key` matches this pattern.
    pub fn matches(&self, routing_key: &str) -> bool {
        if routing_key.is_empty() {
            return self.matches_words(&[]);
        }
        // Avoid allocating for the common short key: split into a small stack buffer.
        let mut buf: [&str; 16] = [""; 16];
        let mut n = 0;
        for w in routing_key.split('.') {
            if n == buf.len() {
                return self.matches_words(&words(routing_key));
            }
            buf[n] = w;
            n += 1;
        }
        self.matches_words(&buf[..n])
    }

    fn matches_words(&self, key: &[&str]) -> bool {
        // reach[j]: the first i pattern words can match the first j key words.
        let m = key.len();
        let mut reach = vec![false; m + 1];
        reach[0] = true;
        for word in &self.words {
            match word {
                Word::Hash => {
                    // `#` extends any reached prefix by any number of words.
                    for j in 1..=m {
                        if reach[j - 1] {
                            reach[j] = true;
                        }
                    }
                }
                Word::Star | Word::Literal(_) => {
                    for j in (1..=m).rev() {
                        let ok = match word {
                            Word::Literal(l) => l == key[j - 1],
                            _ => true,
                        };
                        reach[j] = reach[j - 1] && ok;
                    }
                    reach[0] = false;
                }
            }
        }
        reach[m]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_matching_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("a.b.c", "a.b.c", true),
            ("a.b.c", "a.b", false),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.c", false),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("a.#", "b.a", false),
            ("#", "", true),
            ("#", "anything.at.all", true),
            ("*", "", false),
            ("*", "one", true),
            ("*", "one.two", false),
            ("", "", true),
            ("", "a", false),
            ("#.c", "c", true),
            ("#.c", "a.b.c", true),
            ("#.c", "a.b.d", false),
            ("a.#.z", "a.z", true),
            ("a.#.z", "a.b.c.z", true),
            ("a.#.z", "a.b.c", false),
            ("*.#", "", false),
            ("*.#", "a", true),
            ("#.*", "a.b", true),
            ("#.#", "", true),
            ("a.*.#", "a", false),
            ("a.*.#", "a.b", true),
            ("*.*", "a.", true),
            ("a.", "a.", true),
            ("a.", "a", false),
            ("#.b.#", "a.b.c", true),
            ("#.b.#", "b", true),
            ("#.b.#", "a.c", false),
            ("stock.usd.*", "stock.usd.nyse", true),
            ("stock.usd.*", "stock.eur.nyse", false),
            ("*.orange.*", "quick.orange.rabbit", true),
            ("*.*.rabbit", "lazy.orange.elephant", false),
            ("lazy.#", "lazy.orange.male.rabbit", true),
        ];
        for (pattern, key, expect) in cases {
            assert_eq!(
                TopicPattern::new(pattern).matches(key),
                *expect,
                "pattern {pattern:?} key {key:?}"
            );
        }
    }

    #[test]
    fn long_keys_match_without_the_stack_buffer() {
        let key = vec!["w"; 40].join(".");
        assert!(TopicPattern::new("w.#.w").matches(&key));
        assert!(!TopicPattern::new("*.*").matches(&key));
    }
}
