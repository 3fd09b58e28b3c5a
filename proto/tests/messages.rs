//! Wire behaviour of the generated messages and the descriptor set served by reflection.

use std::collections::BTreeSet;

use baton_proto::FILE_DESCRIPTOR_SET;
use baton_proto::v1::{
    ChatMessage, ChatMessages, GenerateRequest, PdMode, SamplingParams, generate_request,
};
use prost::Message;
use prost_types::FileDescriptorSet;

fn chat_request() -> GenerateRequest {
    GenerateRequest {
        model: String::new(),
        input: Some(generate_request::Input::Chat(ChatMessages {
            messages: vec![
                ChatMessage {
                    role: "system".into(),
                    content: "Answer briefly.".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: "Why is the sky blue? \u{1f30c}".into(),
                },
            ],
        })),
        sampling: Some(SamplingParams {
            temperature: Some(0.0),
            top_k: Some(40),
            seed: Some(u64::MAX),
            max_tokens: Some(64),
            stop: vec!["\n\n".into()],
            stop_token_ids: vec![2, 32000],
            logprobs: Some(0),
            ..Default::default()
        }),
        pd_mode: PdMode::Force.into(),
        request_id: "req-7".into(),
        skip_special_tokens: Some(false),
        allow_cloud: None,
        max_cost_usd: Some(0.25),
        ttft_target_seconds: Some(1.5),
    }
}

#[test]
fn generate_request_round_trips_oneof_and_optional_fields() -> anyhow::Result<()> {
    let request = chat_request();
    let decoded = GenerateRequest::decode(request.encode_to_vec().as_slice())?;
    assert_eq!(decoded, request);

    let sampling = decoded.sampling.as_ref().expect("sampling was set");
    assert_eq!(sampling.temperature, Some(0.0));
    assert_eq!(sampling.top_p, None);
    assert_eq!(sampling.logprobs, Some(0));
    assert_eq!(decoded.skip_special_tokens, Some(false));
    assert_eq!(decoded.allow_cloud, None);
    assert_eq!(decoded.pd_mode(), PdMode::Force);
    assert!(
        matches!(decoded.input, Some(generate_request::Input::Chat(ref c)) if c.messages.len() == 2)
    );
    Ok(())
}

#[test]
fn explicit_zero_sampling_field_differs_from_unset() -> anyhow::Result<()> {
    let unset = SamplingParams::default();
    let zero = SamplingParams {
        temperature: Some(0.0),
        ..Default::default()
    };
    assert!(unset.encode_to_vec().is_empty());
    assert_ne!(zero.encode_to_vec(), unset.encode_to_vec());
    assert_eq!(
        SamplingParams::decode(zero.encode_to_vec().as_slice())?.temperature,
        Some(0.0)
    );
    assert_eq!(
        SamplingParams::decode(unset.encode_to_vec().as_slice())?.temperature,
        None
    );
    Ok(())
}

#[test]
fn pd_mode_defaults_to_auto() {
    assert_eq!(GenerateRequest::default().pd_mode(), PdMode::Auto);
}

#[test]
fn descriptor_set_holds_the_baton_services() -> anyhow::Result<()> {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)?;
    let services: BTreeSet<String> = set
        .file
        .iter()
        .flat_map(|file| {
            file.service
                .iter()
                .map(move |s| format!("{}.{}", file.package(), s.name()))
        })
        .collect();
    for expected in [
        "baton.v1.Inference",
        "baton.v1.PrefillWorker",
        "baton.v1.DecodeWorker",
    ] {
        assert!(
            services.contains(expected),
            "{expected} missing from {services:?}"
        );
    }
    Ok(())
}

// Field numbers of descriptor.proto, used in SourceCodeInfo paths.
const FILE_MESSAGE_TYPE: i32 = 4;
const FILE_ENUM_TYPE: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED_TYPE: i32 = 3;
const MESSAGE_ENUM_TYPE: i32 = 4;
const MESSAGE_ONEOF_DECL: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

fn message_paths(
    message: &prost_types::DescriptorProto,
    path: Vec<i32>,
    name: String,
    out: &mut Vec<(Vec<i32>, String)>,
) {
    for (i, field) in message.field.iter().enumerate() {
        let field_path = [path.clone(), vec![MESSAGE_FIELD, i as i32]].concat();
        out.push((field_path, format!("{name}.{}", field.name())));
    }
    for (i, oneof) in message.oneof_decl.iter().enumerate() {
        // proto3 `optional` fields sit in synthetic oneofs named `_<field>`; they have no source.
        if oneof.name().starts_with('_') {
            continue;
        }
        let oneof_path = [path.clone(), vec![MESSAGE_ONEOF_DECL, i as i32]].concat();
        out.push((oneof_path, format!("{name}.{}", oneof.name())));
    }
    for (i, nested) in message.nested_type.iter().enumerate() {
        let nested_path = [path.clone(), vec![MESSAGE_NESTED_TYPE, i as i32]].concat();
        let nested_name = format!("{name}.{}", nested.name());
        out.push((nested_path.clone(), nested_name.clone()));
        message_paths(nested, nested_path, nested_name, out);
    }
    for (i, e) in message.enum_type.iter().enumerate() {
        let enum_path = [path.clone(), vec![MESSAGE_ENUM_TYPE, i as i32]].concat();
        enum_paths(e, enum_path, format!("{name}.{}", e.name()), out);
    }
}

fn enum_paths(
    e: &prost_types::EnumDescriptorProto,
    path: Vec<i32>,
    name: String,
    out: &mut Vec<(Vec<i32>, String)>,
) {
    for (i, value) in e.value.iter().enumerate() {
        let value_path = [path.clone(), vec![ENUM_VALUE, i as i32]].concat();
        out.push((value_path, format!("{name}.{}", value.name())));
    }
    out.push((path, name));
}

#[test]
fn every_baton_element_has_a_doc_comment() -> anyhow::Result<()> {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)?;
    let mut undocumented = Vec::new();
    let mut checked = 0;
    for file in set.file.iter().filter(|f| f.package() == "baton.v1") {
        let documented: BTreeSet<Vec<i32>> = file
            .source_code_info
            .as_ref()
            .expect("descriptor set carries source info")
            .location
            .iter()
            .filter(|l| !l.leading_comments().trim().is_empty())
            .map(|l| l.path.clone())
            .collect();

        let mut elements = Vec::new();
        for (i, message) in file.message_type.iter().enumerate() {
            let path = vec![FILE_MESSAGE_TYPE, i as i32];
            elements.push((path.clone(), message.name().to_string()));
            message_paths(message, path, message.name().to_string(), &mut elements);
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            enum_paths(
                e,
                vec![FILE_ENUM_TYPE, i as i32],
                e.name().to_string(),
                &mut elements,
            );
        }
        for (i, service) in file.service.iter().enumerate() {
            let path = vec![FILE_SERVICE, i as i32];
            for (j, method) in service.method.iter().enumerate() {
                let method_path = [path.clone(), vec![SERVICE_METHOD, j as i32]].concat();
                elements.push((method_path, format!("{}.{}", service.name(), method.name())));
            }
            elements.push((path, service.name().to_string()));
        }

        checked += elements.len();
        undocumented.extend(
            elements
                .into_iter()
                .filter(|(path, _)| !documented.contains(path))
                .map(|(_, name)| format!("{}: {name}", file.name())),
        );
    }
    assert!(checked > 200, "only {checked} elements found");
    assert!(undocumented.is_empty(), "undocumented: {undocumented:#?}");
    Ok(())
}
