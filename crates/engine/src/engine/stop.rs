//! Stop strings: text is passed on as it comes, except a tail that could still grow into a
//! stop string, and nothing from the first stop string on.

/// Watches generated text for any of a request's stop strings.
pub struct StopMatcher {
    /// The non-empty stop strings, with their places in the request's list.
    stops: Vec<(usize, String)>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.is_empty())
                .map(|(i, s)| (i, s.clone()))
                .collect(),
            held: String::new(),
        }
    }

    /// Takes the next piece of text. Returns the text that is safe to pass on, and the place
    /// in the request's list of the stop string reached, if one was (the one that starts first;
    /// of those, the first listed). The stop string and anything after it are dropped.
    pub fn push(&mut self, piece: &str) -> (String, Option<usize>) {
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|(i, s)| Some((*i, self.held.find(s.as_str())?)))
            .min_by_key(|&(_, at)| at);
        if let Some((stop, at)) = first {
            self.held.truncate(at);
            return (std::mem::take(&mut self.held), Some(stop));
        }
        let keep = self.longest_partial();
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, None)
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
                        .any(|(_, s)| s.len() > n && s.starts_with(&h[h.len() - n..]))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_matches_and_cuts_at_the_stop() {
        let stops = ["", "END", "\n\n"].map(String::from);
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), None));
        assert_eq!(m.push("N"), (String::new(), None));
        assert_eq!(m.push("x"), ("ENx".to_string(), None));
        assert_eq!(m.push("a\n"), ("a".to_string(), None));
        assert_eq!(
            m.push("\nrest"),
            (String::new(), Some(2)),
            "the place in the request's list"
        );
        let mut m = StopMatcher::new(&["é!".to_string()]);
        assert_eq!(m.push("caf"), ("caf".to_string(), None));
        assert_eq!(m.push("é"), (String::new(), None));
        assert_eq!(m.finish(), "é");
    }

    #[test]
    fn reports_the_stop_string_that_starts_first() {
        let stops = ["lo w", "hel", "hello"].map(String::from);
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("say hello world"), ("say ".to_string(), Some(1)));
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("yello world"), ("yel".to_string(), Some(0)));
    }
}
