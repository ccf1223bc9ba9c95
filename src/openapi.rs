//! The layer's contract in an OpenAPI document, with `utoipa` (feature `openapi`): the
//! `Idempotency-Key` header parameter, the `Idempotent-Replayed` response header and the
//! problem responses the layer answers, added to the operations it covers.
//!
//! ```
//! use http::Method;
//! use tower_idempotency::openapi::document;
//! use utoipa::openapi::{OpenApiBuilder, PathsBuilder, PathItem, HttpMethod};
//! use utoipa::openapi::path::OperationBuilder;
//! use utoipa::openapi::response::ResponseBuilder;
//!
//! let mut api = OpenApiBuilder::new()
//!     .paths(PathsBuilder::new().path(
//!         "/orders",
//!         PathItem::new(
//!             HttpMethod::Post,
//!             OperationBuilder::new()
//!                 .response("201", ResponseBuilder::new().description("created")),
//!         ),
//!     ))
//!     .build();
//! document(&mut api, &[Method::POST, Method::PATCH]);
//! let json = api.to_json().unwrap();
//! assert!(json.contains("Idempotency-Key") && json.contains("Idempotent-Replayed"));
//! ```

use http::Method;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, HeaderBuilder, OpenApi, Ref, RefOr, Required,
};

use crate::problem::ProblemKind;

/// The name of the problem schema added to the document's components.
pub const PROBLEM_SCHEMA: &str = "IdempotencyProblem";

/// Adds the layer's contract to every operation of `api` whose method is in `methods` (the
/// layer's [`methods`](crate::IdempotencyLayer::methods); `POST` and `PATCH` by default):
/// the required `Idempotency-Key` header, `Idempotent-Replayed` on their success
/// responses, and the problem responses (`400`, `403`, `409`, `410`, `413`, `422`, `500`,
/// `503`, with `Retry-After` on `409` and `503`) with an RFC 9457 body. Answers the number
/// of operations documented. Operations that already describe a status keep their own.
pub fn document(api: &mut OpenApi, methods: &[Method]) -> usize {
    let mut documented = 0;
    for item in api.paths.paths.values_mut() {
        let operations = [
            (Method::POST, item.post.as_mut()),
            (Method::PATCH, item.patch.as_mut()),
            (Method::PUT, item.put.as_mut()),
            (Method::DELETE, item.delete.as_mut()),
            (Method::GET, item.get.as_mut()),
        ];
        for (method, operation) in operations {
            if let Some(operation) = operation
                && methods.contains(&method)
            {
                document_operation(operation);
                documented += 1;
            }
        }
    }
    if documented > 0 {
        let components = api
            .components
            .get_or_insert_with(|| ComponentsBuilder::new().build());
        components
            .schemas
            .entry(PROBLEM_SCHEMA.to_owned())
            .or_insert_with(|| RefOr::T(problem_schema()));
    }
    documented
}

fn string() -> utoipa::openapi::schema::Object {
    ObjectBuilder::new().schema_type(Type::String).build()
}

fn problem_schema() -> utoipa::openapi::schema::Schema {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "An RFC 9457 problem answered by the idempotency layer.",
        ))
        .property("type", ObjectBuilder::new().schema_type(Type::String))
        .property("title", ObjectBuilder::new().schema_type(Type::String))
        .property("status", ObjectBuilder::new().schema_type(Type::Integer))
        .property("detail", ObjectBuilder::new().schema_type(Type::String))
        .required("type")
        .required("title")
        .required("status")
        .into()
}

/// Adds the contract to one operation.
pub fn document_operation(operation: &mut Operation) {
    let parameters = operation.parameters.get_or_insert_with(Vec::new);
    let has_key = parameters.iter().any(|p| match p {
        RefOr::T(p) => p.name.eq_ignore_ascii_case("idempotency-key"),
        RefOr::Ref(_) => false,
    });
    if !has_key {
        parameters.push(RefOr::T(
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .required(Required::True)
                .description(Some(
                    "A unique key for this operation; a retry with the same key and payload \
                     gets the first answer, replayed.",
                ))
                .schema(Some(string()))
                .build(),
        ));
    }
    let replayed = HeaderBuilder::new()
        .schema(Some(string()))
        .description(Some("`true` on an answer replayed from a first request."))
        .build();
    for (status, response) in operation.responses.responses.iter_mut() {
        if status.starts_with('2')
            && let RefOr::T(response) = response
        {
            response
                .headers
                .entry("Idempotent-Replayed".to_owned())
                .or_insert_with(|| RefOr::T(replayed.clone()));
        }
    }
    let problems: [(&str, &[ProblemKind]); 8] = [
        (
            "400",
            &[
                ProblemKind::MissingKey,
                ProblemKind::InvalidKey,
                ProblemKind::BodyUnreadable,
            ],
        ),
        ("403", &[ProblemKind::CallerUnknown]),
        ("409", &[ProblemKind::KeyInUse]),
        ("410", &[ProblemKind::ResponseNotStored]),
        ("413", &[ProblemKind::RequestTooLarge]),
        ("422", &[ProblemKind::KeyReused]),
        (
            "500",
            &[ProblemKind::RecordUnreadable, ProblemKind::OutcomeUnknown],
        ),
        (
            "503",
            &[ProblemKind::StoreUnavailable, ProblemKind::StoreFull],
        ),
    ];
    for (status, kinds) in problems {
        if operation.responses.responses.contains_key(status) {
            continue;
        }
        let slugs: Vec<&str> = kinds.iter().map(|k| k.slug()).collect();
        let mut response = ResponseBuilder::new()
            .description(format!(
                "The idempotency layer's answer ({}).",
                slugs.join(", ")
            ))
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name(PROBLEM_SCHEMA)))
                    .build(),
            );
        if matches!(status, "409" | "503") {
            response = response.header(
                "Retry-After",
                HeaderBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
                    .description(Some("Seconds to wait before retrying with the same key."))
                    .build(),
            );
        }
        operation
            .responses
            .responses
            .insert(status.to_owned(), RefOr::T(response.build()));
    }
}
