//! The configured limits on new input, and the dispatcher's limits for a start on stored state.
//!
//! The limits (`--max-tags`, `--max-groups`, `--max-name-len`, `--max-classes`) apply to what
//! clients send from now on, not to what the store already holds: a restart with a smaller
//! limit must still load every stored task and worker. So the dispatcher is built with limits
//! wide enough for the stored state ([`widened`]), and the configured ones are checked here, on
//! every new task, worker and tag change, before the dispatcher sees it. The name rules
//! themselves are the dispatcher's ([`switchyard::Limits::check_name`]).

use switchyard::Limits;

use crate::error::ApiError;
use crate::store::Recovery;

/// A refusal by the limits, as the 400 a client gets; the message names the flag to change.
fn refused(e: switchyard::Error) -> ApiError {
    let message = match e {
        switchyard::Error::InvalidInput(m) => m,
        other => other.to_string(),
    };
    let message = [
        ("(max tags)", "(--max-tags)"),
        ("(max groups)", "(--max-groups)"),
        ("(max name length)", "(--max-name-len)"),
        ("(max classes)", "(--max-classes)"),
    ]
    .iter()
    .fold(message, |m, (from, to)| m.replace(from, to));
    ApiError::invalid_input(message)
}

/// Checks a new task's group and tags (or a tag change, with `group` `None`).
pub fn check_task<S: AsRef<str>>(
    group: Option<&str>,
    tags: &[S],
    limits: &Limits,
) -> Result<(), ApiError> {
    match group {
        Some(group) => limits.check_task(group, tags),
        None => limits.check_tags(tags),
    }
    .map_err(refused)
}

/// Checks a new worker's groups and tags.
pub fn check_worker<S: AsRef<str>, T: AsRef<str>>(
    groups: &[S],
    tags: &[T],
    limits: &Limits,
) -> Result<(), ApiError> {
    limits.check_worker(groups, tags).map_err(refused)
}

/// Checks that a task of a new class (`known` false) fits under `--max-classes`, given the
/// `count` of classes the dispatcher has.
pub fn check_class_count(known: bool, count: usize, limits: &Limits) -> Result<(), ApiError> {
    if known || count < limits.max_classes {
        return Ok(());
    }
    Err(ApiError::invalid_input(format!(
        "{count} task classes (group and tag set) exist; the limit (--max-classes) is {}; \
         use tags that repeat, or raise the limit",
        limits.max_classes
    )))
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
    fn refusals_name_the_flag_to_change() {
        let l = Limits::default();
        let long = "x".repeat(l.max_name_len + 1);
        let e = check_task(Some("g"), &[long.as_str()], &l).unwrap_err();
        assert!(format!("{e:?}").contains("(--max-name-len)"), "{e:?}");
        let many: Vec<String> = (0..=l.max_tags).map(|i| format!("t{i}")).collect();
        let e = check_worker(&["g"], &many, &l).unwrap_err();
        assert!(format!("{e:?}").contains("(--max-tags)"), "{e:?}");
        let e = check_task(None, &["a\u{202E}b"], &l).unwrap_err();
        assert!(format!("{e:?}").contains("U+202E"), "{e:?}");
    }

    #[test]
    fn a_new_class_must_fit_under_the_limit() {
        let l = Limits {
            max_classes: 2,
            ..Limits::default()
        };
        assert!(check_class_count(false, 1, &l).is_ok());
        assert!(
            check_class_count(true, 2, &l).is_ok(),
            "a known class always fits"
        );
        let e = check_class_count(false, 2, &l).unwrap_err();
        assert!(format!("{e:?}").contains("--max-classes"), "{e:?}");
    }

    #[test]
    fn limits_widen_to_the_stored_state() {
        let configured = Limits {
            max_tags: 1,
            max_groups: 1,
            max_name_len: 4,
            max_classes: 1,
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
