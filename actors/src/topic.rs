//! AMQP topic patterns, matched the way RabbitMQ's topic exchange matches them.
//!
//! A routing key is a list of words separated by `.`; words may be empty
//! (`a..b` has three words, the middle one empty) and the empty key has no
//! words at all. In a pattern, `*` stands for exactly one word (possibly an
//! empty one) and `#` for zero or more words. So `#` matches every key,
//! including the empty one; `a.#` matches `a`, `a.b` and `a.b.c`; `a.#.b`
//! matches `a.b`; `*` does not match the empty key but does match `.`'s
//! neighbours (`*.*` matches `.`); and the empty pattern matches only the
//! empty key.
//!
//! One deliberate difference with RabbitMQ: a word that mixes a wildcard with
//! other characters (`orders*`, `#a`) is refused instead of being taken
//! literally, because in a filter typed by a person it is almost always a
//! mistake that would silently match nothing.

use std::fmt;
use std::str::FromStr;

/// The longest pattern accepted, in bytes: an AMQP short string, like a
/// routing key or a binding key.
pub const MAX_PATTERN_BYTES: usize = 255;

/// A validated AMQP topic pattern (`*` one word, `#` zero or more words).
///
/// Two patterns are equal when their text is equal, so observers with the same
/// filter can share the same selection of events.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicPattern {
    /// The pattern as given, for display and for equality.
    source: String,
    /// The compiled form, chosen so that common patterns match cheaply.
    kind: Kind,
}

/// How a pattern is matched.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Kind {
    /// Only `#` (or `#.#`...): matches every key without looking at it.
    Any,
    /// No wildcard at all: the key must equal the pattern.
    Exact,
    /// Anything else: word-by-word matching with backtracking on `#`.
    Words(Vec<Word>),
}

/// One word of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Word {
    /// `*`: exactly one word.
    One,
    /// `#`: zero or more words.
    Many,
    /// A word that must be equal.
    Literal(String),
}

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Longer than an AMQP short string.
    #[error("topic pattern is {0} bytes long, the limit is {MAX_PATTERN_BYTES}")]
    TooLong(usize),
    /// A word mixes `*` or `#` with other characters.
    #[error("topic pattern word {0:?} mixes a wildcard with other characters: `*` and `#` must be whole words between dots")]
    MixedWildcard(String),
}

impl TopicPattern {
    /// Parses and validates a pattern.
    pub fn parse(pattern: &str) -> Result<TopicPattern, PatternError> {
        if pattern.len() > MAX_PATTERN_BYTES {
            return Err(PatternError::TooLong(pattern.len()));
        }
        let mut words: Vec<Word> = Vec::new();
        if !pattern.is_empty() {
            for word in pattern.split('.') {
                let word = match word {
                    "*" => Word::One,
                    "#" => Word::Many,
                    w if w.contains(['*', '#']) => {
                        return Err(PatternError::MixedWildcard(w.to_owned()))
                    }
                    w => Word::Literal(w.to_owned()),
                };
                // `#.#` means the same as `#`; collapsing keeps matching linear.
                if word == Word::Many && words.last() == Some(&Word::Many) {
                    continue;
                }
                words.push(word);
            }
        }
        let kind = if words == [Word::Many] {
            Kind::Any
        } else if words.iter().all(|w| matches!(w, Word::Literal(_))) {
            Kind::Exact
        } else {
            Kind::Words(words)
        };
        Ok(TopicPattern {
            source: pattern.to_owned(),
            kind,
        })
    }

    /// The pattern that matches every routing key (`#`).
    pub fn any() -> TopicPattern {
        TopicPattern {
            source: "#".to_owned(),
            kind: Kind::Any,
        }
    }

    /// The pattern as it was given.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether this pattern matches every routing key.
    pub fn matches_everything(&self) -> bool {
        self.kind == Kind::Any
    }

    /// Whether `routing_key` matches this pattern, by RabbitMQ's rules.
    pub fn matches(&self, routing_key: &str) -> bool {
        match &self.kind {
            Kind::Any => true,
            Kind::Exact => self.source == routing_key,
            Kind::Words(words) => match_words(words, routing_key),
        }
    }
}

impl FromStr for TopicPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicPattern::parse(s)
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Splits the first word off the rest of a key. `None` means no words are left
/// (which is different from one empty word left: `Some("")`).
fn next_word(rest: &str) -> (&str, Option<&str>) {
    match rest.split_once('.') {
        Some((word, tail)) => (word, Some(tail)),
        None => (rest, None),
    }
}

/// Glob matching over words, without allocating: `#` first matches zero words,
/// and on a later mismatch the most recent `#` takes one more word and matching
/// resumes after it. Adjacent `#`s were collapsed at parse time, so this is
/// linear in practice and at worst `O(pattern × key)`.
fn match_words(words: &[Word], routing_key: &str) -> bool {
    let mut p = 0;
    let mut key = if routing_key.is_empty() {
        None
    } else {
        Some(routing_key)
    };
    // Where to resume when the last `#` must absorb one more word: the pattern
    // index just after it, and the key position it had absorbed up to.
    let mut resume: Option<(usize, &str)> = None;
    loop {
        let Some(rest) = key else {
            // No words left: what remains of the pattern must be able to match
            // nothing, which only `#` can.
            return words[p..].iter().all(|w| *w == Word::Many);
        };
        let (word, tail) = next_word(rest);
        match words.get(p) {
            Some(Word::Many) => {
                resume = Some((p + 1, rest));
                p += 1;
                continue;
            }
            Some(Word::One) => {
                p += 1;
                key = tail;
                continue;
            }
            Some(Word::Literal(lit)) if lit == word => {
                p += 1;
                key = tail;
                continue;
            }
            _ => {}
        }
        match resume {
            Some((after_hash, absorbed)) => {
                let (_, tail) = next_word(absorbed);
                p = after_hash;
                key = tail;
                if let Some(tail) = tail {
                    resume = Some((after_hash, tail));
                }
            }
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, key: &str) -> bool {
        TopicPattern::parse(pattern)
            .expect("valid pattern")
            .matches(key)
    }

    #[test]
    fn hash_alone_matches_everything_including_the_empty_key() {
        for key in ["", "a", "a.b", ".", "a..b", "..."] {
            assert!(matches("#", key), "# should match {key:?}");
            assert!(matches("#.#", key), "#.# should match {key:?}");
        }
        assert!(TopicPattern::parse("#")
            .expect("valid")
            .matches_everything());
        assert!(TopicPattern::any().matches("x.y"));
    }

    #[test]
    fn star_is_exactly_one_word() {
        assert!(matches("a.*", "a.b"));
        assert!(!matches("a.*", "a"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(matches("*", "a"));
        assert!(!matches("*", ""));
        assert!(!matches("*", "a.b"));
        assert!(matches("*.b.*", "a.b.c"));
        assert!(!matches("*.b.*", "a.b"));
    }

    #[test]
    fn hash_is_zero_or_more_words() {
        assert!(matches("a.#", "a"));
        assert!(matches("a.#", "a.b"));
        assert!(matches("a.#", "a.b.c"));
        assert!(!matches("a.#", "b.a"));
        assert!(!matches("a.#", ""));
        assert!(matches("#.a", "a"));
        assert!(matches("#.a", "x.y.a"));
        assert!(!matches("#.a", "a.x"));
        assert!(matches("a.#.b", "a.b"));
        assert!(matches("a.#.b", "a.x.b"));
        assert!(matches("a.#.b", "a.x.y.b"));
        assert!(!matches("a.#.b", "a.x.y"));
        assert!(matches("#.b.#", "b"));
        assert!(matches("#.b.#", "a.b.c"));
        assert!(!matches("#.b.#", "a.c"));
    }

    #[test]
    fn star_versus_hash() {
        assert!(matches("a.*", "a.b") && matches("a.#", "a.b"));
        assert!(!matches("a.*", "a") && matches("a.#", "a"));
        assert!(!matches("a.*", "a.b.c") && matches("a.#", "a.b.c"));
        assert!(matches("*.#", "a"));
        assert!(!matches("*.#", ""));
        assert!(matches("#.*", "a.b"));
        assert!(!matches("#.*", ""));
        assert!(matches("*.*.#", "a.b"));
        assert!(!matches("*.*.#", "a"));
    }

    #[test]
    fn empty_words_are_words() {
        assert!(matches("*.*", "."));
        assert!(matches("a.*.b", "a..b"));
        assert!(matches("a..b", "a..b"));
        assert!(!matches("a.b", "a..b"));
        assert!(!matches("*", ""));
        assert!(matches(".", "."));
        assert!(matches("a.", "a."));
        assert!(matches("a.*", "a."));
        assert!(matches("#.", "a."));
        assert!(matches("#", "."));
    }

    #[test]
    fn empty_pattern_matches_only_the_empty_key() {
        assert!(matches("", ""));
        assert!(!matches("", "a"));
        assert!(!matches("", "."));
    }

    #[test]
    fn literal_patterns_compare_whole_keys() {
        assert!(matches("orders.created", "orders.created"));
        assert!(!matches("orders.created", "orders.created.eu"));
        assert!(!matches("orders", "orders.created"));
    }

    #[test]
    fn mixed_wildcards_and_long_patterns_are_refused() {
        assert!(matches!(
            TopicPattern::parse("orders*"),
            Err(PatternError::MixedWildcard(w)) if w == "orders*"
        ));
        assert!(TopicPattern::parse("a.#b").is_err());
        assert!(TopicPattern::parse("a.**").is_err());
        assert!(matches!(
            TopicPattern::parse(&"a".repeat(256)),
            Err(PatternError::TooLong(256))
        ));
        assert!(TopicPattern::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn display_and_equality_use_the_source_text() {
        let p: TopicPattern = "a.*".parse().expect("valid");
        assert_eq!(p.to_string(), "a.*");
        assert_eq!(p, TopicPattern::parse("a.*").expect("valid"));
        assert_ne!(p, TopicPattern::parse("a.#").expect("valid"));
    }

    /// A direct transcription of the rules, exponential but obviously right.
    fn reference(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|n| reference(rest, &key[n..])),
            Some((&"*", rest)) => !key.is_empty() && reference(rest, &key[1..]),
            Some((lit, rest)) => key.first() == Some(lit) && reference(rest, &key[1..]),
        }
    }

    fn words(s: &str) -> Vec<&str> {
        if s.is_empty() {
            Vec::new()
        } else {
            s.split('.').collect()
        }
    }

    /// Every string of up to `max` words over `alphabet`, joined with dots.
    fn all_strings(alphabet: &[&str], max: usize) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut level: Vec<Vec<&str>> = vec![Vec::new()];
        for _ in 0..max {
            let mut next = Vec::new();
            for prefix in &level {
                for w in alphabet {
                    let mut v = prefix.clone();
                    v.push(w);
                    out.push(v.join("."));
                    next.push(v);
                }
            }
            level = next;
        }
        out
    }

    #[test]
    fn agrees_with_the_reference_on_every_small_case() {
        let patterns = all_strings(&["a", "b", "*", "#", ""], 4);
        let keys = all_strings(&["a", "b", ""], 4);
        for pattern in &patterns {
            let compiled = TopicPattern::parse(pattern).expect("valid pattern");
            for key in &keys {
                assert_eq!(
                    compiled.matches(key),
                    reference(&words(pattern), &words(key)),
                    "pattern {pattern:?} against key {key:?}"
                );
            }
        }
    }
}
