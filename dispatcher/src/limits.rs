//! Input limits and the rules every group and tag name follows.
//!
//! A name must be readable where operators see it (logs, lists, a dashboard): not blank, no
//! white space at either end, and free of control, invisible and bidirectional-control
//! characters, which could make two different names look alike or reorder the text around them.
//! The checks change nothing, so a caller (a coordinator that must make a task durable before
//! the dispatcher takes it) can run them first and get the same answer the dispatcher would.

use crate::error::{Error, Result};

/// Bounds on input. A request outside them is refused with [`Error::InvalidInput`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most tags on one task or one worker.
    pub max_tags: usize,
    /// Most groups one worker serves.
    pub max_groups: usize,
    /// Longest group or tag name, in bytes.
    pub max_name_len: usize,
    /// Most task classes (distinct group and tag set pairs) the dispatcher keeps. Classes live
    /// as long as the dispatcher, so this bounds what a stream of one-off tag sets can cost in
    /// memory and in fanout fetches; a task of a new class beyond it is refused.
    pub max_classes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tags: 32,
            max_groups: 32,
            max_name_len: 128,
            max_classes: 1 << 16,
        }
    }
}

/// Characters that render as nothing or reorder text: format and filler characters, variation
/// selectors, bidirectional controls, and the tag block.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}'
        | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}'
        | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
        | '\u{FFF0}'..='\u{FFFB}'
        | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}')
}

impl Limits {
    pub(crate) fn validate(&self) -> Result<()> {
        if [
            self.max_tags,
            self.max_groups,
            self.max_name_len,
            self.max_classes,
        ]
        .contains(&0)
        {
            return Err(Error::InvalidInput("limits must be ≥ 1".into()));
        }
        Ok(())
    }

    /// Checks one group or tag name (`kind` names it in the error).
    pub fn check_name(&self, kind: &str, name: &str) -> Result<()> {
        let Some(why) = self.name_problem(name) else {
            return Ok(());
        };
        // The name as quoted in an error: at most 64 characters of it.
        let shown: String = name.chars().take(64).collect();
        let cut = if shown.len() < name.len() { "…" } else { "" };
        Err(Error::InvalidInput(format!(
            "{kind} name {shown:?}{cut} {why}"
        )))
    }

    /// What is wrong with `name`, if anything.
    fn name_problem(&self, name: &str) -> Option<String> {
        if name.trim().is_empty() {
            return Some("is blank".into());
        }
        if name.len() > self.max_name_len {
            return Some(format!(
                "is {} bytes; the limit (max name length) is {}",
                name.len(),
                self.max_name_len
            ));
        }
        if name.trim() != name {
            return Some("starts or ends with white space".into());
        }
        // Printable ASCII (the usual name) needs no character scan.
        if name.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return None;
        }
        let c = name
            .chars()
            .find(|&c| c.is_control() || invisible(c) || (c.is_whitespace() && c != ' '))?;
        Some(format!(
            "contains U+{:04X}, a control, invisible or bidirectional-control character",
            c as u32
        ))
    }

    /// Checks a list of names against its count limit `max` (`limit` names it) and the rules.
    fn check_names<S: AsRef<str>>(
        &self,
        kind: &str,
        names: &[S],
        max: usize,
        limit: &str,
    ) -> Result<()> {
        if names.len() > max {
            return Err(Error::InvalidInput(format!(
                "{} {kind}s given; the limit ({limit}) is {max}",
                names.len()
            )));
        }
        names
            .iter()
            .try_for_each(|n| self.check_name(kind, n.as_ref()))
    }

    /// Checks a task's tags.
    pub fn check_tags<S: AsRef<str>>(&self, tags: &[S]) -> Result<()> {
        self.check_names("tag", tags, self.max_tags, "max tags")
    }

    /// Checks a task's group and tags.
    pub fn check_task<S: AsRef<str>>(&self, group: &str, tags: &[S]) -> Result<()> {
        self.check_name("group", group)?;
        self.check_tags(tags)
    }

    /// Checks a worker's groups (at least one) and tags.
    pub fn check_worker<G: AsRef<str>, T: AsRef<str>>(
        &self,
        groups: &[G],
        tags: &[T],
    ) -> Result<()> {
        if groups.is_empty() {
            return Err(Error::InvalidInput(
                "a worker must serve at least one group".into(),
            ));
        }
        self.check_names("group", groups, self.max_groups, "max groups")?;
        self.check_tags(tags)
    }
}

#[cfg(test)]
mod tests {
    use super::Limits;

    #[test]
    fn names_that_read_wrong_are_refused() {
        let l = Limits::default();
        for ok in ["gpu", "render farm", "ünïcode", "日本", "a-b_c.d:e/f"] {
            assert!(l.check_name("tag", ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            " ",
            "\t",
            " lead",
            "trail ",
            "a\u{202E}b", // right-to-left override
            "a\u{200B}b", // zero-width space
            "a\u{2066}b", // left-to-right isolate
            "a\u{FEFF}",  // byte order mark
            "a\u{00AD}b", // soft hyphen
            "a\u{3000}b", // ideographic space
            "a\nb",
            "a\u{E0041}", // tag character
        ] {
            assert!(l.check_name("tag", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_limit_is_exact() {
        let l = Limits {
            max_tags: 2,
            max_groups: 3,
            max_name_len: 5,
            max_classes: 1,
        };
        assert!(l.check_name("tag", "abcde").is_ok());
        let err = l.check_name("tag", "abcdef").unwrap_err().to_string();
        assert!(err.contains("6 bytes") && err.contains("is 5"), "{err}");
        // A multi-byte name counts bytes: "éé" is 4 bytes, "ééé" is 6.
        assert!(l.check_name("tag", "éé").is_ok());
        assert!(l.check_name("tag", "ééé").is_err());
        // An error quotes at most 64 characters of the name, and marks a cut.
        let long = Limits::default();
        let err = long
            .check_name("tag", &"x".repeat(200))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("\"{}\"…", "x".repeat(64))), "{err}");
        let err = long.check_name("tag", "a\u{200B}").unwrap_err().to_string();
        assert!(!err.contains('…'), "{err}");

        assert!(l.check_tags(&["a", "b"]).is_ok());
        let err = l.check_tags(&["a", "b", "c"]).unwrap_err().to_string();
        assert!(err.contains("3 tags") && err.contains("is 2"), "{err}");
        assert!(l.check_tags::<&str>(&[]).is_ok());

        assert!(l.check_worker(&["a", "b", "c"], &["t"]).is_ok());
        assert!(l.check_worker(&["a", "b", "c", "d"], &["t"]).is_err());
        assert!(l.check_worker::<&str, &str>(&[], &[]).is_err());
        assert!(l.check_worker(&["a"], &["t", "u", "v"]).is_err());
        assert!(l.check_worker(&["a", " b"], &["t"]).is_err());

        assert!(l.check_task("g", &["a", "b"]).is_ok());
        assert!(l.check_task("", &["a"]).is_err());
        assert!(l.check_task("g", &["a", ""]).is_err());
        assert!(l.check_task("abcdef", &["a"]).is_err());
    }

    #[test]
    fn every_limit_must_be_positive() {
        assert!(Limits::default().validate().is_ok());
        let zero = |f: fn(&mut Limits)| {
            let mut l = Limits::default();
            f(&mut l);
            l.validate().is_err()
        };
        assert!(zero(|l| l.max_tags = 0));
        assert!(zero(|l| l.max_groups = 0));
        assert!(zero(|l| l.max_name_len = 0));
        assert!(zero(|l| l.max_classes = 0));
    }
}
