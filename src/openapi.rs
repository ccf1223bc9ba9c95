//! The layer's contract in an OpenAPI document, with `utoipa` (feature `openapi`): the
//! `Idempotency-Key` header parameter, the `Idempotent-Replayed` response header and the
//! problem responses the layer answers, added to the operations it covers.
//!
//! [`document`] describes the default [RFC 9457 profile](crate::problem::Profile::Rfc9457);
//! a layer set to another [`problem_profile`](crate::IdempotencyLayer::problem_profile) is
//! described by [`document_with_profile`], with that profile's statuses, content type and
//! body schema.
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

use crate::problem::{ProblemKind, Profile};

/// The name of the problem schema added to the document's components (RFC 9457 profile).
pub const PROBLEM_SCHEMA: &str = "IdempotencyProblem";

/// The name of the error schema added to the document's components under the Stripe
/// profile.
pub const STRIPE_ERROR_SCHEMA: &str = "IdempotencyStripeError";

/// The name of the error schema added to the document's components under the Agentic
/// Commerce profile.
pub const AGENTIC_COMMERCE_ERROR_SCHEMA: &str = "IdempotencyAgenticCommerceError";

/// The name of the schema of `profile`'s answers in the document's components.
///
/// ```
/// use tower_idempotency::openapi::{PROBLEM_SCHEMA, schema_name};
/// use tower_idempotency::problem::Profile;
///
/// assert_eq!(schema_name(Profile::Rfc9457), PROBLEM_SCHEMA);
/// assert_eq!(schema_name(Profile::Stripe), "IdempotencyStripeError");
/// ```
pub fn schema_name(profile: Profile) -> &'static str {
    match profile {
        Profile::Stripe => STRIPE_ERROR_SCHEMA,
        Profile::AgenticCommerce => AGENTIC_COMMERCE_ERROR_SCHEMA,
        _ => PROBLEM_SCHEMA,
    }
}

/// Every kind, in the order the responses list them.
const KINDS: [ProblemKind; 12] = [
    ProblemKind::MissingKey,
    ProblemKind::InvalidKey,
    ProblemKind::BodyUnreadable,
    ProblemKind::RequestTooLarge,
    ProblemKind::KeyInUse,
    ProblemKind::KeyReused,
    ProblemKind::ResponseNotStored,
    ProblemKind::CallerUnknown,
    ProblemKind::StoreUnavailable,
    ProblemKind::StoreFull,
    ProblemKind::RecordUnreadable,
    ProblemKind::OutcomeUnknown,
];

/// Adds the layer's contract to every operation of `api` whose method is in `methods` (the
/// layer's [`methods`](crate::IdempotencyLayer::methods); `POST` and `PATCH` by default):
/// the required `Idempotency-Key` header, `Idempotent-Replayed` on their success
/// responses, and the problem responses (`400`, `403`, `409`, `410`, `413`, `422`, `500`,
/// `503`, with `Retry-After` on `409` and `503`) with an RFC 9457 body. Answers the number
/// of operations documented. Operations that already describe a status keep their own.
pub fn document(api: &mut OpenApi, methods: &[Method]) -> usize {
    document_with_profile(api, methods, Profile::Rfc9457)
}

/// [`document`], for a layer whose answers follow `profile` (its
/// [`problem_profile`](crate::IdempotencyLayer::problem_profile)): the problem responses
/// have that profile's statuses (Stripe answers a reused key with `400`, not `422`),
/// content type and body schema (named [`schema_name`]), and their descriptions list the
/// codes the body carries.
///
/// ```
/// use http::Method;
/// use tower_idempotency::openapi::document_with_profile;
/// use tower_idempotency::problem::Profile;
/// use utoipa::openapi::path::OperationBuilder;
/// use utoipa::openapi::response::ResponseBuilder;
/// use utoipa::openapi::{HttpMethod, OpenApiBuilder, PathItem, PathsBuilder};
///
/// let mut api = OpenApiBuilder::new()
///     .paths(PathsBuilder::new().path(
///         "/checkout_sessions",
///         PathItem::new(
///             HttpMethod::Post,
///             OperationBuilder::new()
///                 .response("201", ResponseBuilder::new().description("created")),
///         ),
///     ))
///     .build();
/// document_with_profile(&mut api, &[Method::POST], Profile::AgenticCommerce);
/// let json = api.to_json().unwrap();
/// assert!(json.contains("idempotency_conflict") && json.contains("IdempotencyAgenticCommerceError"));
/// ```
pub fn document_with_profile(api: &mut OpenApi, methods: &[Method], profile: Profile) -> usize {
    document_with(
        api,
        &|m| methods.contains(m),
        &Contract::default_for(profile),
    )
}

/// [`document`], as `layer` is set: the methods it covers (those of
/// [`methods`](crate::IdempotencyLayer::methods); none when it covers by a
/// [`cover_when`](crate::IdempotencyLayer::cover_when) function, which only the request can
/// answer), its key header ([`header_name`](crate::IdempotencyLayer::header_name)), whether
/// a key is required ([`missing_key`](crate::IdempotencyLayer::missing_key)) and its
/// [`problem_profile`](crate::IdempotencyLayer::problem_profile).
///
/// ```
/// use http::HeaderName;
/// use tower_idempotency::openapi::document_layer;
/// use tower_idempotency::{IdempotencyLayer, MissingKey};
/// use utoipa::openapi::path::OperationBuilder;
/// use utoipa::openapi::response::ResponseBuilder;
/// use utoipa::openapi::{HttpMethod, OpenApiBuilder, PathItem, PathsBuilder};
///
/// let layer = IdempotencyLayer::default()
///     .header_name(HeaderName::from_static("x-request-key"))
///     .missing_key(MissingKey::Optional);
/// let mut api = OpenApiBuilder::new()
///     .paths(PathsBuilder::new().path(
///         "/orders",
///         PathItem::new(
///             HttpMethod::Post,
///             OperationBuilder::new().response("201", ResponseBuilder::new().description("created")),
///         ),
///     ))
///     .build();
/// assert_eq!(document_layer(&mut api, &layer), 1);
/// let json = api.to_json().unwrap();
/// assert!(json.contains("x-request-key") && !json.contains("Idempotency-Key"));
/// ```
pub fn document_layer(api: &mut OpenApi, layer: &crate::IdempotencyLayer) -> usize {
    let settings = layer.settings();
    let contract = Contract {
        profile: settings.problem_profile,
        header: settings.header.as_str().to_owned(),
        required: matches!(settings.missing, crate::policy::MissingKey::Required)
            || settings.key_pointer.is_some(),
        in_body: settings.key_pointer.as_deref().map(str::to_owned),
    };
    match &settings.cover {
        crate::settings::Cover::Methods(methods) => {
            document_with(api, &|m| methods.contains(m), &contract)
        }
        crate::settings::Cover::When(_) => 0,
    }
}

/// What the documentation says of a layer's key.
struct Contract {
    profile: Profile,
    /// The key's header.
    header: String,
    /// Whether a request without a key is refused.
    required: bool,
    /// The JSON pointer of a key read from the body, instead of the header.
    in_body: Option<String>,
}

impl Contract {
    fn default_for(profile: Profile) -> Self {
        Self {
            profile,
            header: "Idempotency-Key".to_owned(),
            required: true,
            in_body: None,
        }
    }
}

fn document_with(
    api: &mut OpenApi,
    covered: &dyn Fn(&Method) -> bool,
    contract: &Contract,
) -> usize {
    let profile = contract.profile;
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
                && covered(&method)
            {
                document_operation_for(operation, contract);
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
            .entry(schema_name(profile).to_owned())
            .or_insert_with(|| RefOr::T(schema_of(profile)));
    }
    documented
}

/// How the problem responses this module adds begin their description (the layer's own
/// refusals, never a stored answer).
const LAYERS_ANSWER: &str = "The idempotency layer's answer";

fn string() -> utoipa::openapi::schema::Object {
    ObjectBuilder::new().schema_type(Type::String).build()
}

fn schema_of(profile: Profile) -> utoipa::openapi::schema::Schema {
    match profile {
        Profile::Stripe => stripe_schema(),
        Profile::AgenticCommerce => agentic_commerce_schema(),
        _ => problem_schema(),
    }
}

/// A string property limited to `values`.
fn one_of(values: &[&str]) -> ObjectBuilder {
    let mut values: Vec<&str> = values.to_vec();
    values.sort_unstable();
    values.dedup();
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
}

/// The `type` values (with `error_type`) or codes (with `code`) `profile` answers.
fn values_of(
    profile: Profile,
    f: fn(Profile, ProblemKind) -> Option<&'static str>,
) -> Vec<&'static str> {
    KINDS.iter().filter_map(|&k| f(profile, k)).collect()
}

fn stripe_schema() -> utoipa::openapi::schema::Schema {
    let profile = Profile::Stripe;
    let error = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("type", one_of(&values_of(profile, Profile::error_type)))
        .property("code", one_of(&values_of(profile, |p, k| Some(p.code(k)))))
        .property("message", ObjectBuilder::new().schema_type(Type::String))
        .property("doc_url", ObjectBuilder::new().schema_type(Type::String))
        .required("type")
        .required("code")
        .required("message");
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "A Stripe-style error object answered by the idempotency layer.",
        ))
        .property("error", error)
        .required("error")
        .into()
}

fn agentic_commerce_schema() -> utoipa::openapi::schema::Schema {
    let profile = Profile::AgenticCommerce;
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "An Agentic Commerce Protocol error answered by the idempotency layer.",
        ))
        .property("type", one_of(&values_of(profile, Profile::error_type)))
        .property("code", one_of(&values_of(profile, |p, k| Some(p.code(k)))))
        .property("message", ObjectBuilder::new().schema_type(Type::String))
        .property("param", ObjectBuilder::new().schema_type(Type::String))
        .required("type")
        .required("code")
        .required("message")
        .into()
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

/// Adds the contract to one operation (RFC 9457 profile).
pub fn document_operation(operation: &mut Operation) {
    document_operation_with_profile(operation, Profile::Rfc9457);
}

/// Adds the contract to one operation, for a layer whose answers follow `profile`.
pub fn document_operation_with_profile(operation: &mut Operation, profile: Profile) {
    document_operation_for(operation, &Contract::default_for(profile));
}

fn document_operation_for(operation: &mut Operation, contract: &Contract) {
    let profile = contract.profile;
    if contract.in_body.is_none() {
        let parameters = operation.parameters.get_or_insert_with(Vec::new);
        let has_key = parameters.iter().any(|p| match p {
            RefOr::T(p) => p.name.eq_ignore_ascii_case(&contract.header),
            RefOr::Ref(_) => false,
        });
        if !has_key {
            let what = if contract.required {
                "A unique key for this operation; a retry with the same key and payload \
                 gets the first answer, replayed."
            } else {
                "A unique key for this operation; a retry with the same key and payload \
                 gets the first answer, replayed. Without one the request is not protected."
            };
            parameters.push(RefOr::T(
                ParameterBuilder::new()
                    .name(&contract.header)
                    .parameter_in(ParameterIn::Header)
                    .required(if contract.required {
                        Required::True
                    } else {
                        Required::False
                    })
                    .description(Some(what))
                    .schema(Some(string()))
                    .build(),
            ));
        }
    } else if let Some(pointer) = &contract.in_body {
        let note = format!(
            "The idempotency key is read from the JSON body, at `{pointer}`: a retry with the \
             same key and payload gets the first answer, replayed."
        );
        operation.description = Some(match operation.description.take() {
            Some(description) if !description.contains(&note) => {
                format!("{description}\n\n{note}")
            }
            Some(description) => description,
            None => note,
        });
    }
    // Every answer the operation documents may be a stored one, replayed (a `4xx` it
    // answered is stored as its `2xx` are).
    let replayed = HeaderBuilder::new()
        .schema(Some(string()))
        .description(Some("`true` on an answer replayed from a first request."))
        .build();
    for response in operation.responses.responses.values_mut() {
        if let RefOr::T(response) = response
            && !response.description.starts_with(LAYERS_ANSWER)
        {
            response
                .headers
                .entry("Idempotent-Replayed".to_owned())
                .or_insert_with(|| RefOr::T(replayed.clone()));
        }
    }
    // The kinds each status answers under this profile, in status order.
    let mut problems: Vec<(String, Vec<ProblemKind>)> = Vec::new();
    let mut statuses: Vec<u16> = KINDS.iter().map(|&k| profile.status(k).as_u16()).collect();
    statuses.sort_unstable();
    statuses.dedup();
    for status in statuses {
        let kinds = KINDS
            .iter()
            .copied()
            .filter(|&k| profile.status(k).as_u16() == status)
            .collect();
        problems.push((status.to_string(), kinds));
    }
    for (status, kinds) in problems {
        let status = status.as_str();
        if operation.responses.responses.contains_key(status) {
            continue;
        }
        let codes: Vec<&str> = kinds.iter().map(|&k| profile.code(k)).collect();
        let mut response = ResponseBuilder::new()
            .description(format!("{LAYERS_ANSWER} ({}).", codes.join(", ")))
            .content(
                profile.content_type(),
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name(schema_name(profile))))
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
