//! Rules for new input: group and tag names, and the configured limits.
//!
//! The limits (`--max-tags`, `--max-groups`, `--max-name-len`) apply to what clients send from
//! now on, not to what the store already holds: a restart with a smaller limit must still load
//! every stored task and worker. So the dispatcher is built with limits wide enough for the
//! stored state ([`widened`]), and the configured ones are checked here, on every new task,
//! worker and tag change, before the dispatcher sees it.
//!
//! A name must also be readable where operators see it (logs, lists, a dashboard): not blank,
//! and free of control, invisible and bidirectional-control characters, which could make two
//! different names look alike or reorder the text around them.

use switchyard::Limits;

use crate::error::ApiError;
use crate::store::Recovery;

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

/// Checks one group or tag name (`kind` names it in the error).
pub fn check_name(kind: &str, name: &str, limits: &Limits) -> Result<(), ApiError> {
    // The name as quoted in an error: at most 64 characters of it.
    let shown: String = name.chars().take(64).collect();
    let cut = if shown.len() < name.len() { "…" } else { "" };
    let bad = |why: &str| {
        Err(ApiError::invalid_input(format!(
            "{kind} name {shown:?}{cut} {why}"
        )))
    };
    if name.trim().is_empty() {
        return bad("is blank");
    }
    if name.len() > limits.max_name_len {
        return bad(&format!(
            "is {} bytes; the limit (--max-name-len) is {}",
            name.len(),
            limits.max_name_len
        ));
    }
    if name.trim() != name {
        return bad("starts or ends with white space");
    }
    if let Some(c) = name
        .chars()
        .find(|&c| c.is_control() || invisible(c) || (c.is_whitespace() && c != ' '))
    {
        return bad(&format!(
            "contains U+{:04X}, a control, invisible or bidirectional-control character",
            c as u32
        ));
    }
    Ok(())
}

/// Checks a list of names against its count limit and the name rules.
fn check_names<S: AsRef<str>>(
    kind: &str,
    names: &[S],
    max: usize,
    flag: &str,
    limits: &Limits,
) -> Result<(), ApiError> {
    if names.len() > max {
        return Err(ApiError::invalid_input(format!(
            "{} {kind}s given; the limit ({flag}) is {max}",
            names.len()
        )));
    }
    names
        .iter()
        .try_for_each(|n| check_name(kind, n.as_ref(), limits))
}

/// Checks a new task's group and tags (or a tag change, with `group` `None`).
pub fn check_task<S: AsRef<str>>(
    group: Option<&str>,
    tags: &[S],
    limits: &Limits,
) -> Result<(), ApiError> {
    if let Some(group) = group {
        check_name("group", group, limits)?;
    }
    check_names("tag", tags, limits.max_tags, "--max-tags", limits)
}

/// Checks a new worker's groups and tags.
pub fn check_worker<S: AsRef<str>, T: AsRef<str>>(
    groups: &[S],
    tags: &[T],
    limits: &Limits,
) -> Result<(), ApiError> {
    check_names("group", groups, limits.max_groups, "--max-groups", limits)?;
    check_names("tag", tags, limits.max_tags, "--max-tags", limits)
}

/// `configured`, widened so that everything in `state` fits: the dispatcher's limits for a
/// start on that state.
pub fn widened(configured: &Limits, state: &Recovery) -> Limits {
    let mut l = configured.clone();
    let longest = |names: &[String]| names.iter().map(String::len).max().unwrap_or(0);
    for t in &state.tasks {
        l.max_tags = l.max_tags.max(t.tags.len());
        l.max_name_len = l.max_name_len.max(t.group.len()).max(longest(&t.tags));
    }
    for w in &state.workers {
        l.max_tags = l.max_tags.max(w.tags.len());
        l.max_groups = l.max_groups.max(w.groups.len());
        l.max_name_len = l.max_name_len.max(longest(&w.groups)).max(longest(&w.tags));
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_read_wrong_are_refused() {
        let l = Limits::default();
        for ok in ["gpu", "render farm", "ünïcode", "日本", "a-b_c.d:e/f"] {
            assert!(check_name("tag", ok, &l).is_ok(), "{ok:?}");
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
            assert!(check_name("tag", bad, &l).is_err(), "{bad:?}");
        }
        let long = "x".repeat(l.max_name_len + 1);
        assert!(check_name("tag", &long, &l).is_err());
    }

    #[test]
    fn limits_widen_to_the_stored_state() {
        let configured = Limits {
            max_tags: 1,
            max_groups: 1,
            max_name_len: 4,
        };
        let mut state = Recovery::default();
        state.tasks.push(crate::store::TaskRecord {
            id: 1,
            group: "longgroup".into(),
            tags: vec!["a".into(), "b".into(), "c".into()],
            priority: 0,
            payload: b"null".to_vec(),
            state: crate::store::TaskState::Queued,
            attempt: 0,
            worker: None,
            outcome: None,
            submitted_ms: 0,
        });
        state.workers.push(crate::store::WorkerRecord {
            id: 1,
            groups: vec!["g".into(), "h".into()],
            tags: vec![],
            token_hash: String::new(),
        });
        let l = widened(&configured, &state);
        assert_eq!((l.max_tags, l.max_groups, l.max_name_len), (3, 2, 9));
        assert_eq!(widened(&configured, &Recovery::default()), configured);
    }
}
