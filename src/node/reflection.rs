//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`, the same
//! messages under two package names), answered from the descriptor set
//! `build.rs` embeds: grpcurl's `list`, `describe` and calls work without
//! proto files.
//!
//! The peer protocol (`multiraft.peer.v1`) is not served on the API port
//! and is left out.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use bytes::Bytes;
use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorSet};

use crate::grpc::{Code, Status, StreamCall};
use crate::proto::grpc::reflection::v1::{
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    ErrorResponse, ExtensionNumberResponse, FileDescriptorResponse, ListServiceResponse,
    ServerReflectionRequest, ServerReflectionResponse, ServiceResponse,
};

pub const V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
pub const V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// Files whose services the API port does not serve.
const HIDDEN_PACKAGES: &[&str] = &["multiraft.peer.v1"];

/// The descriptors, indexed.
struct Index {
    /// Encoded `FileDescriptorProto` and dependencies, by file name.
    files: HashMap<String, (Bytes, Vec<String>)>,
    /// The file defining each fully qualified symbol.
    symbols: HashMap<String, String>,
    /// Message types (for extension-number queries, which have none here).
    messages: BTreeSet<String>,
    services: Vec<String>,
}

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let set = FileDescriptorSet::decode(crate::proto::DESCRIPTORS)
            .expect("build.rs embeds a valid descriptor set");
        build(set)
    })
}

fn build(set: FileDescriptorSet) -> Index {
    let mut ix = Index {
        files: HashMap::new(),
        symbols: HashMap::new(),
        messages: BTreeSet::new(),
        services: Vec::new(),
    };
    for file in set.file {
        let package = file.package().to_owned();
        if HIDDEN_PACKAGES.contains(&package.as_str()) {
            continue;
        }
        let name = file.name().to_owned();
        let qualify = |n: &str| {
            if package.is_empty() {
                n.to_owned()
            } else {
                format!("{package}.{n}")
            }
        };
        for s in &file.service {
            let svc = qualify(s.name());
            for m in &s.method {
                ix.symbols
                    .insert(format!("{svc}.{}", m.name()), name.clone());
            }
            ix.symbols.insert(svc.clone(), name.clone());
            ix.services.push(svc);
        }
        for e in &file.enum_type {
            ix.symbols.insert(qualify(e.name()), name.clone());
        }
        for m in &file.message_type {
            add_message(&mut ix, &name, &qualify(m.name()), m);
        }
        ix.files.insert(
            name,
            (Bytes::from(file.encode_to_vec()), file.dependency.clone()),
        );
    }
    ix.services.sort();
    ix
}

fn add_message(ix: &mut Index, file: &str, full: &str, m: &DescriptorProto) {
    ix.symbols.insert(full.to_owned(), file.to_owned());
    ix.messages.insert(full.to_owned());
    for e in &m.enum_type {
        ix.symbols
            .insert(format!("{full}.{}", e.name()), file.to_owned());
    }
    for n in &m.nested_type {
        add_message(ix, file, &format!("{full}.{}", n.name()), n);
    }
}

/// `name` first, then every file it depends on, transitively (clients
/// accept any order).
fn with_dependencies(ix: &Index, name: &str) -> Vec<Bytes> {
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    let mut todo = vec![name.to_owned()];
    while let Some(f) = todo.pop() {
        if !seen.insert(f.clone()) {
            continue;
        }
        if let Some((bytes, deps)) = ix.files.get(&f) {
            order.push(bytes.clone());
            todo.extend(deps.iter().cloned());
        }
    }
    order
}

fn not_found(what: String) -> MessageResponse {
    MessageResponse::ErrorResponse(ErrorResponse {
        error_code: Code::NotFound as i32,
        error_message: what,
    })
}

/// The answer to one reflection request.
fn answer(req: ServerReflectionRequest) -> ServerReflectionResponse {
    let ix = index();
    let files = |name: &str| {
        MessageResponse::FileDescriptorResponse(FileDescriptorResponse {
            file_descriptor_proto: with_dependencies(ix, name),
        })
    };
    let response = match &req.message_request {
        Some(MessageRequest::ListServices(_)) => {
            MessageResponse::ListServicesResponse(ListServiceResponse {
                service: ix
                    .services
                    .iter()
                    .map(|name| ServiceResponse { name: name.clone() })
                    .collect(),
            })
        }
        Some(MessageRequest::FileByFilename(name)) => match ix.files.contains_key(name) {
            true => files(name),
            false => not_found(format!("file {name:?} not found")),
        },
        Some(MessageRequest::FileContainingSymbol(symbol)) => {
            match ix.symbols.get(symbol.trim_start_matches('.')) {
                Some(file) => files(file),
                None => not_found(format!("symbol {symbol:?} not found")),
            }
        }
        Some(MessageRequest::FileContainingExtension(e)) => not_found(format!(
            "no extension {} of {:?} (these protos define none)",
            e.extension_number, e.containing_type
        )),
        Some(MessageRequest::AllExtensionNumbersOfType(t)) => {
            match ix.messages.contains(t.trim_start_matches('.')) {
                true => MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
                    base_type_name: t.clone(),
                    extension_number: Vec::new(),
                }),
                false => not_found(format!("type {t:?} not found")),
            }
        }
        None => MessageResponse::ErrorResponse(ErrorResponse {
            error_code: Code::InvalidArgument as i32,
            error_message: "the request asks for nothing".into(),
        }),
    };
    ServerReflectionResponse {
        valid_host: req.host.clone(),
        original_request: Some(req),
        message_response: Some(response),
    }
}

/// Serves one `ServerReflectionInfo` stream (either version: their
/// messages are the same on the wire): one response per request, until
/// the client half-closes.
pub async fn serve(mut call: StreamCall) -> Result<(), Status> {
    while let Some(msg) = call.incoming.next().await {
        let req = ServerReflectionRequest::decode(msg?).map_err(|e| {
            Status::invalid_argument(format!("cannot decode ServerReflectionRequest: {e}"))
        })?;
        call.outgoing
            .send(Bytes::from(answer(req).encode_to_vec()))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::FileDescriptorProto;

    fn ask(r: MessageRequest) -> MessageResponse {
        answer(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(r),
        })
        .message_response
        .unwrap()
    }

    fn file_names(r: MessageResponse) -> Vec<String> {
        match r {
            MessageResponse::FileDescriptorResponse(f) => f
                .file_descriptor_proto
                .iter()
                .map(|b| {
                    FileDescriptorProto::decode(&b[..])
                        .unwrap()
                        .name()
                        .to_owned()
                })
                .collect(),
            other => panic!("not files: {other:?}"),
        }
    }

    #[test]
    fn lists_the_api_services_and_not_the_peer_protocol() {
        let MessageResponse::ListServicesResponse(l) =
            ask(MessageRequest::ListServices(String::new()))
        else {
            panic!("not a list");
        };
        let names: Vec<_> = l.service.into_iter().map(|s| s.name).collect();
        for want in [
            "atomix.multiraft.v1.Node",
            "multiraft.kv.v1.KV",
            "multiraft.admin.v1.Admin",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n.starts_with("multiraft.peer")),
            "{names:?}"
        );
    }

    #[test]
    fn symbols_resolve_to_their_files_with_dependencies() {
        let kv = file_names(ask(MessageRequest::FileContainingSymbol(
            "multiraft.kv.v1.KV".into(),
        )));
        assert_eq!(kv[0], "multiraft/kv/v1/kv.proto");
        for symbol in [
            "multiraft.kv.v1.KV.Put",
            "multiraft.kv.v1.PutRequest",
            ".atomix.multiraft.v1.Node",
            "grpc.health.v1.HealthCheckResponse.ServingStatus",
        ] {
            let files = file_names(ask(MessageRequest::FileContainingSymbol(symbol.into())));
            assert!(!files.is_empty(), "{symbol}");
        }
        // Every dependency of the node proto comes along.
        let node = file_names(ask(MessageRequest::FileByFilename(
            "atomix/multiraft/v1/node.proto".into(),
        )));
        let deps = FileDescriptorSet::decode(crate::proto::DESCRIPTORS)
            .unwrap()
            .file
            .into_iter()
            .find(|f| f.name() == "atomix/multiraft/v1/node.proto")
            .unwrap()
            .dependency;
        for d in deps {
            assert!(node.contains(&d), "{d} missing from {node:?}");
        }
    }

    #[test]
    fn unknown_names_are_not_found() {
        for r in [
            MessageRequest::FileContainingSymbol("no.such.Thing".into()),
            MessageRequest::FileByFilename("nope.proto".into()),
            MessageRequest::FileContainingSymbol("multiraft.peer.v1.Envelope".into()),
        ] {
            match ask(r) {
                MessageResponse::ErrorResponse(e) => {
                    assert_eq!(e.error_code, Code::NotFound as i32)
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
