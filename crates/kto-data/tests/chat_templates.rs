//! Chat templates rendered by minijinja against Jinja2 in transformers' environment (golden outputs made by
//! tests/fixtures/make_chat_templates.py).
use kto_data::chat_template::{ChatTemplate, SpecialTokens};
use kto_data::Message;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    template: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    expected: Option<String>,
    error: Option<String>,
}

#[test]
fn minijinja_renders_as_jinja2_does() {
    let text = include_str!("fixtures/chat_templates.json");
    let cases: Vec<Case> = serde_json::from_str(text).unwrap();
    assert!(cases.len() >= 30);
    let tokens = SpecialTokens {
        bos_token: Some("<s>".into()),
        eos_token: Some("</s>".into()),
        unk_token: Some("<unk>".into()),
        pad_token: None,
    };
    for case in cases {
        let template = ChatTemplate::new(case.template.clone(), tokens.clone()).unwrap();
        let rendered = template.render(&case.messages, case.add_generation_prompt);
        let context = format!(
            "{} (add_generation_prompt {}) on {:?}",
            case.name, case.add_generation_prompt, case.messages
        );
        match (case.expected, case.error) {
            (Some(expected), _) => assert_eq!(rendered.unwrap(), expected, "{context}"),
            (None, Some(error)) => {
                let message = format!("{:#}", rendered.unwrap_err());
                assert!(message.contains(&error), "{context}: {message}");
            }
            (None, None) => panic!("{context}: the case has neither an output nor an error"),
        }
    }
}
