//! Stop strings: text is passed on as it comes, except a tail that could still grow into a
//! stop string, and nothing from the first stop string on.

/// Watches generated text for any of a request's stop strings.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Takes the next piece of text. Returns the text that is safe to pass on, and whether a
    /// stop string was reached (the stop string and anything after it are dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            self.held.truncate(at);
            return (std::mem::take(&mut self.held), true);
        }
        let keep = self.longest_partial();
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// The text held back at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The longest tail of the held text that is a proper prefix of a stop string.
    fn longest_partial(&self) -> usize {
        let h = &self.held;
        (1..=h.len())
            .rev()
            .find(|&n| {
                h.is_char_boundary(h.len() - n)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.len() > n && s.starts_with(&h[h.len() - n..]))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_matches_and_cuts_at_the_stop() {
        let mut m = StopMatcher::new(&["END".to_string(), "\n\n".to_string()]);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("x"), ("ENx".to_string(), false));
        assert_eq!(m.push("a\n"), ("a".to_string(), false));
        assert_eq!(m.push("\nrest"), (String::new(), true));
        let mut m = StopMatcher::new(&["é!".to_string()]);
        assert_eq!(m.push("caf"), ("caf".to_string(), false));
        assert_eq!(m.push("é"), (String::new(), false));
        assert_eq!(m.finish(), "é");
    }
}
