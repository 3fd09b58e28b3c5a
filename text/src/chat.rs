//! Chat templates: turn a conversation into the prompt text a model was trained on.
//!
//! client messages --[ChatTemplate::render]--> prompt text --[Tokenizer::encode]--> token ids
//!
//! This runs at the coordinator, before tokenization. The template comes from the model
//! (GGUF `tokenizer.chat_template`, or `chat_template` in a Hugging Face `tokenizer_config.json`)
//! and is compiled once with minijinja, configured the way Hugging Face `transformers` renders
//! templates: `trim_blocks` and `lstrip_blocks` on, Python string and dict methods through
//! minijinja-contrib's pycompat, `raise_exception(msg)` and `strftime_now(fmt)` available, and
//! `bos_token` / `eos_token` defined when the model has them.
//!
//! The rendered text already contains the model's special tokens (`<|im_start|>`, a BOS token
//! when the template writes `{{ bos_token }}`), so it is encoded with
//! `add_special_tokens = false`, as `transformers`' `apply_chat_template` does.
//!
//! Invariants: a template that fails to compile or render is an [`Error`], never a panic; a
//! model without a template has no `ChatTemplate` (callers decide what to do; none is invented).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Name under which the one template lives in its environment.
const TEMPLATE_NAME: &str = "chat";

/// Who wrote a chat message (not to be confused with a worker's role in the engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person talking to the model.
    User,
    /// The model's earlier replies.
    Assistant,
    /// The result of a tool call, fed back to the model.
    Tool,
}

impl Role {
    /// The role as templates see it (`message['role']`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    /// Parses the OpenAI role names; anything else is [`Error::UnknownRole`].
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            "tool" => Ok(Role::Tool),
            other => Err(Error::UnknownRole {
                role: other.to_owned(),
            }),
        }
    }
}

/// One message of a conversation, as the template sees it: `{"role": ..., "content": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote the message.
    pub role: Role,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` with `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A compiled chat template. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct ChatTemplate {
    inner: Arc<Compiled>,
}

struct Compiled {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the texts of the model's special tokens;
    /// the template sees them as `bos_token` and `eos_token` (undefined when `None`).
    /// `strftime_now` reads the system clock.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        Self::with_clock(source, bos_token, eos_token, SystemTime::now)
    }

    /// Like [`ChatTemplate::new`], with the clock `strftime_now` reads injected (for tests and
    /// reproducible prompts).
    pub fn with_clock(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        clock: fn() -> SystemTime,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks; templates are written for it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        // Jinja2's `iterable` is false for None; minijinja iterates None as empty. Templates test
        // `tools is iterable` with `tools = None`.
        env.add_test("iterable", |value: &Value| {
            !value.is_none() && !value.is_undefined() && value.try_iter().is_ok()
        });
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", move |format: &str| {
            strftime_utc(clock(), format)
        });
        env.add_template_owned(TEMPLATE_NAME, without_generation_tags(&source))
            .map_err(|err| Error::ChatTemplateSyntax {
                reason: describe(&err),
            })?;
        Ok(Self {
            inner: Arc::new(Compiled {
                env,
                source,
                bos_token,
                eos_token,
            }),
        })
    }

    /// The template source, as the model ships it.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Renders `messages` into prompt text. With `add_generation_prompt` the text ends with the
    /// opening of an assistant turn, ready for the model to continue.
    ///
    /// A template that calls `raise_exception` gives [`Error::ChatTemplateRaised`] with its message
    /// (templates use it to reject conversations, e.g. roles that do not alternate); any other
    /// failure gives [`Error::ChatTemplateRender`].
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let inner = &*self.inner;
        let template =
            inner
                .env
                .get_template(TEMPLATE_NAME)
                .map_err(|err| Error::ChatTemplateRender {
                    reason: describe(&err),
                })?;
        // transformers passes `tools` and `documents` even when there are none, and templates
        // test `tools is not none`, which an undefined value would pass.
        let mut context: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        if let Some(bos) = &inner.bos_token {
            context.push(("bos_token", Value::from(bos.as_str())));
        }
        if let Some(eos) = &inner.eos_token {
            context.push(("eos_token", Value::from(eos.as_str())));
        }
        template
            .render(Value::from_iter(context))
            .map_err(|err| match raised_message(&err) {
                Some(message) => Error::ChatTemplateRaised { message },
                None => Error::ChatTemplateRender {
                    reason: describe(&err),
                },
            })
    }
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.inner.source.len())
            .field("bos_token", &self.inner.bos_token)
            .field("eos_token", &self.inner.eos_token)
            .finish()
    }
}

/// Carries the message of a template's `raise_exception(msg)` through minijinja's error, so
/// `render` can tell a deliberate rejection from a broken template.
#[derive(Debug)]
struct Raised(String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(Raised(message)),
    )
}

fn raised_message(err: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if let Some(Raised(message)) = current.downcast_ref::<Raised>() {
            return Some(message.clone());
        }
        source = current.source();
    }
    None
}

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` tags, which only mark the
/// assistant's text for training masks, to `{% if true %}` / `{% endif %}`: same output, same
/// whitespace control, and a syntax minijinja knows.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let (before, tag) = rest.split_at(open);
        out.push_str(before);
        let body = &tag[2..];
        let marker_len = usize::from(body.starts_with(['-', '+']));
        let (marker, body) = body.split_at(marker_len);
        let keyword_start = body.len() - body.trim_start().len();
        let (space, body) = body.split_at(keyword_start);
        let replacement = [("endgeneration", "endif"), ("generation", "if true")]
            .into_iter()
            .find(|(keyword, _)| {
                body.strip_prefix(keyword).is_some_and(|after| {
                    after.starts_with(|c: char| c.is_whitespace() || "-+%".contains(c))
                })
            });
        out.push_str("{%");
        out.push_str(marker);
        out.push_str(space);
        match replacement {
            Some((keyword, with)) => {
                out.push_str(with);
                rest = &body[keyword.len()..];
            }
            None => rest = body,
        }
    }
    out.push_str(rest);
    out
}

/// The error's message with its location, e.g. `syntax error: unexpected end of input (in chat:1)`.
fn describe(err: &minijinja::Error) -> String {
    err.to_string()
}

/// Python's `time.strftime(format)` for the common directives, in UTC (the engine has no time
/// zone database). Unknown directives are copied through, as glibc does.
fn strftime_utc(now: SystemTime, format: &str) -> String {
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];

    // A clock before 1970 is a broken clock; render the epoch rather than fail the request.
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let secs_of_day = secs % 86_400;
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday.
    let weekday = ((days + 4) % 7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = DAYS[weekday];
    let hour12 = match hour % 12 {
        0 => 12,
        h => h,
    };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // `%-d` (glibc): no padding.
        let (pad, directive) = match chars.next() {
            Some('-') => (false, chars.next()),
            other => (true, other),
        };
        let num = |n: u64, width: usize| {
            if pad {
                format!("{n:0width$}")
            } else {
                n.to_string()
            }
        };
        match directive {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&num(year % 100, 2)),
            Some('m') => out.push_str(&num(month, 2)),
            Some('d') => out.push_str(&num(day, 2)),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&num(hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('M') => out.push_str(&num(minute, 2)),
            Some('S') => out.push_str(&num(second, 2)),
            Some('j') => out.push_str(&num(day_of_year, 3)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('a') => out.push_str(&day_name[..3]),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if !pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`, restricted to dates after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Inverse of [`civil_from_days`], for years from 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y % 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn fixed_clock() -> SystemTime {
        // 2024-02-29T13:05:09Z, a Thursday in a leap year.
        UNIX_EPOCH + Duration::from_secs(1_709_211_909)
    }

    #[test]
    fn role_parses_openai_names_and_rejects_others() {
        assert_eq!("assistant".parse::<Role>().ok(), Some(Role::Assistant));
        assert_eq!("tool".parse::<Role>().ok(), Some(Role::Tool));
        match "developer".parse::<Role>() {
            Err(Error::UnknownRole { role }) => assert_eq!(role, "developer"),
            other => panic!("expected UnknownRole, got {other:?}"),
        }
    }

    #[test]
    fn strftime_formats_the_common_directives_in_utc() {
        let now = fixed_clock();
        assert_eq!(strftime_utc(now, "%d %b %Y"), "29 Feb 2024");
        assert_eq!(
            strftime_utc(now, "%A, %B %-d, %y"),
            "Thursday, February 29, 24"
        );
        assert_eq!(
            strftime_utc(now, "%F %T %j %I%p %%"),
            "2024-02-29 13:05:09 060 01PM %"
        );
        assert_eq!(strftime_utc(UNIX_EPOCH, "%Y-%m-%d %a"), "1970-01-01 Thu");
        assert_eq!(strftime_utc(now, "%Q"), "%Q");
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in (0..200_000).step_by(37) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn template_sees_special_tokens_and_strftime_now() {
        let template = ChatTemplate::with_clock(
            "{{ bos_token }}{{ strftime_now('%d %b %Y') }}|{% for m in messages %}{{ m.role }}={{ m.content.strip() }};{% endfor %}{{ eos_token }}",
            Some("<s>".into()),
            Some("</s>".into()),
            fixed_clock,
        )
        .expect("template compiles");
        let text = template
            .render(&[ChatMessage::new(Role::User, "  hi  ")], false)
            .expect("renders");
        assert_eq!(text, "<s>29 Feb 2024|user=hi;</s>");
    }

    #[test]
    fn missing_special_tokens_render_empty() {
        let template = ChatTemplate::new("[{{ bos_token }}]", None, None).expect("compiles");
        assert_eq!(template.render(&[], false).expect("renders"), "[]");
    }

    #[test]
    fn block_tags_trim_like_transformers() {
        let template = ChatTemplate::new(
            "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}",
            None,
            None,
        )
        .expect("compiles");
        let messages = [
            ChatMessage::new(Role::User, "a"),
            ChatMessage::new(Role::Assistant, "b"),
        ];
        assert_eq!(
            template.render(&messages, false).expect("renders"),
            "    a\n    b\n"
        );
    }

    #[test]
    fn raise_exception_is_a_typed_rejection() {
        let template = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok",
            None,
            None,
        )
        .expect("compiles");
        match template.render(&[ChatMessage::new(Role::Assistant, "x")], false) {
            Err(Error::ChatTemplateRaised { message }) => {
                assert_eq!(message, "first message must be from the user")
            }
            other => panic!("expected ChatTemplateRaised, got {other:?}"),
        }
        assert_eq!(
            template
                .render(&[ChatMessage::new(Role::User, "x")], false)
                .expect("renders"),
            "ok"
        );
    }

    #[test]
    fn render_failure_is_a_typed_error() {
        let template = ChatTemplate::new("{{ messages[0].content.no_such_method() }}", None, None)
            .expect("compiles");
        assert!(matches!(
            template.render(&[ChatMessage::new(Role::User, "x")], false),
            Err(Error::ChatTemplateRender { .. })
        ));
    }

    #[test]
    fn generation_tags_render_their_content() {
        assert_eq!(
            without_generation_tags("a{%- generation -%} b {% endgeneration %}{%generations%}"),
            "a{%- if true -%} b {% endif %}{%generations%}"
        );
        let template = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%}\n[{{ m.content }}]\n{%- endgeneration -%}{% endif %}{% endfor %}",
            None,
            None,
        )
        .expect("compiles");
        let messages = [ChatMessage::new(Role::Assistant, "x")];
        assert_eq!(template.render(&messages, false).expect("renders"), "[x]");
    }

    #[test]
    fn tools_and_documents_are_none_like_transformers() {
        let template = ChatTemplate::new(
            "{% if tools is not none and tools|length > 0 %}tools{% else %}none{% endif %}|{{ tools is iterable }}{{ [] is iterable }}{{ 'ab' is iterable }}{{ 3 is iterable }}",
            None,
            None,
        )
        .expect("compiles");
        assert_eq!(
            template.render(&[], false).expect("renders"),
            // Booleans print the Python way, as in Jinja2.
            "none|FalseTrueTrueFalse"
        );
    }

    #[test]
    fn syntax_error_is_a_typed_error() {
        assert!(matches!(
            ChatTemplate::new("{% for m in messages %}", None, None),
            Err(Error::ChatTemplateSyntax { .. })
        ));
    }
}
