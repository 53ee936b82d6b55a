//! Hugging Face chat templates (`chat_template` in tokenizer_config.json, or `chat_template.jinja`) rendered with
//! minijinja in the environment transformers 5.17 sets up (`utils/chat_template_utils.py`):
//! `trim_blocks` and `lstrip_blocks`, `{% break %}`/`{% continue %}`, `raise_exception(message)`, a `tojson` that
//! writes JSON as Python's `json.dumps` does (`", "` and `": "` separators, no HTML escaping, `indent`,
//! `sort_keys`), Python's str/dict/list methods (`.strip()`, `.items()`, ... via minijinja-contrib's pycompat), and
//! the variables `messages`, `add_generation_prompt`, `tools`/`documents` (none), and the tokenizer's special
//! tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token`).
//!
//! `strftime_now` is deliberately not defined: templates that use it (Llama 3.x) fall back to their fixed date,
//! which keeps tokenization reproducible.
use anyhow::{Context, Result};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use crate::sample::Message;

const TEMPLATE_NAME: &str = "chat_template";

/// The special tokens a template may refer to (HF's `special_tokens_map`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; errors name the template's line.
    pub fn new(source: impl Into<String>, special_tokens: SpecialTokens) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.into())
            .context("chat_template does not compile")?;
        Ok(Self {
            env,
            special_tokens,
        })
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// Renders a conversation as `tokenizer.apply_chat_template(messages, tokenize=False, ...)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME)?;
        let tokens = &self.special_tokens;
        let context = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            tools => Value::from(()),
            documents => Value::from(()),
            bos_token => tokens.bos_token.clone(),
            eos_token => tokens.eos_token.clone(),
            unk_token => tokens.unk_token.clone(),
            pad_token => tokens.pad_token.clone(),
        };
        template
            .render(context)
            .map_err(|e| anyhow::anyhow!("chat_template failed to render: {}", error_chain(&e)))
    }
}

fn error_chain(error: &Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

/// HF templates call `raise_exception("...")` to reject conversations they cannot render.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators,
/// sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item_separator, key_separator) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be (item, key)",
            ))
        }
        None => (
            (if indent.is_some() { "," } else { ", " }).to_owned(),
            ": ".to_owned(),
        ),
    };
    let style = JsonStyle {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        item_separator,
        key_separator,
    };
    let mut out = String::new();
    write_json(&value, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<usize>,
    sort_keys: bool,
    item_separator: String,
    key_separator: String,
}

impl JsonStyle {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(indent) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent * depth));
        }
    }
}

fn write_json(
    value: &Value,
    style: &JsonStyle,
    depth: usize,
    out: &mut String,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&python_number(value)),
        ValueKind::String | ValueKind::Plain | ValueKind::Bytes | ValueKind::Invalid => {
            write_json_string(&value.to_string(), out)
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort();
            }
            write_container('{', '}', keys.len(), style, depth, out, |i, out| {
                write_json_string(&keys[i].to_string(), out);
                out.push_str(&style.key_separator);
                write_json(&value.get_item(&keys[i])?, style, depth + 1, out)
            })?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container('[', ']', items.len(), style, depth, out, |i, out| {
                write_json(&items[i], style, depth + 1, out)
            })?;
        }
        _ => write_json_string(&value.to_string(), out),
    }
    Ok(())
}

fn write_container(
    open: char,
    close: char,
    len: usize,
    style: &JsonStyle,
    depth: usize,
    out: &mut String,
    mut write_item: impl FnMut(usize, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len > 0 {
        for i in 0..len {
            if i > 0 {
                out.push_str(&style.item_separator);
            }
            style.newline(depth + 1, out);
            write_item(i, out)?;
        }
        style.newline(depth, out);
    }
    out.push(close);
    Ok(())
}

/// Python's `repr` of an int or a float (`1.0`, not `1`).
fn python_number(value: &Value) -> String {
    if let Some(int) = value.as_i64() {
        if !value.to_string().contains(['.', 'e', 'E', 'i', 'N']) {
            return int.to_string();
        }
    }
    let float = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    if !float.is_finite() {
        return if float.is_nan() {
            "NaN".into()
        } else if float > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let text = serde_json::to_string(&float).unwrap_or_else(|_| float.to_string());
    if text.contains(['.', 'e', 'E']) {
        text
    } else {
        format!("{text}.0")
    }
}

fn write_json_string(text: &str, out: &mut String) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> SpecialTokens {
        SpecialTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            unk_token: None,
            pad_token: None,
        }
    }

    /// Zephyr's template (HuggingFaceH4/zephyr-7b-beta), as shipped in its tokenizer_config.json.
    const ZEPHYR: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

    #[test]
    fn renders_zephyr_with_trim_blocks() {
        let template = ChatTemplate::new(ZEPHYR, tokens()).unwrap();
        let messages = [
            Message::new("system", "Be nice."),
            Message::new("user", "Hi"),
        ];
        assert_eq!(
            template.render(&messages, true).unwrap(),
            "<|system|>\nBe nice.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
        );
        assert_eq!(
            template.render(&messages, false).unwrap(),
            "<|system|>\nBe nice.</s>\n<|user|>\nHi</s>\n"
        );
    }

    #[test]
    fn raise_exception_and_python_methods() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Conversation roles must be user/assistant') }}{% endif %}[{{ m.role.upper() }}] {{ m.content.strip() }}\n{% endfor %}";
        let template = ChatTemplate::new(source, tokens()).unwrap();
        let rendered = template
            .render(&[Message::new("user", "  hello  ")], false)
            .unwrap();
        assert_eq!(rendered, "<s>[USER] hello\n");
        let error = template
            .render(&[Message::new("tool", "x")], false)
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("Conversation roles must be user/assistant"),
            "{error:#}"
        );
    }

    #[test]
    fn loop_controls_and_namespace() {
        let source = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m.content }}{% if ns.n == 2 %}{% break %}{% endif %}{% endfor %}";
        let template = ChatTemplate::new(source, tokens()).unwrap();
        let messages = [
            Message::new("system", "S"),
            Message::new("user", "a"),
            Message::new("assistant", "b"),
            Message::new("user", "c"),
        ];
        assert_eq!(template.render(&messages, false).unwrap(), "ab");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let source = "{{ messages[0] | tojson }}|{{ {'b': 1.0, 'a': [1, 'x<y'], 'c': none} | tojson(sort_keys=true) }}|{{ [1, 2] | tojson(indent=2) }}";
        let template = ChatTemplate::new(source, tokens()).unwrap();
        let rendered = template
            .render(&[Message::new("user", "say \"hi\"\n")], false)
            .unwrap();
        assert_eq!(
            rendered,
            "{\"role\": \"user\", \"content\": \"say \\\"hi\\\"\\n\"}|{\"a\": [1, \"x<y\"], \"b\": 1.0, \"c\": null}|[\n  1,\n  2\n]"
        );
    }

    #[test]
    fn compile_errors_are_reported() {
        let error = ChatTemplate::new("{% for m in messages %}", tokens()).unwrap_err();
        assert!(
            format!("{error:#}").contains("chat_template does not compile"),
            "{error:#}"
        );
    }
}
