//! `examples/openapi.rs`: the document it serves carries the idempotency contract on the
//! operations the layer covers, and only on those.
#![cfg(feature = "openapi")]

use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/openapi.rs"]
mod example;

#[tokio::test]
async fn the_served_document_describes_the_contract_on_covered_operations_only() {
    let res = example::app()
        .oneshot(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let doc: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let post = &doc["paths"]["/orders"]["post"];
    let key = post["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Idempotency-Key")
        .expect("the key parameter");
    assert_eq!(key["in"], "header");
    assert_eq!(key["required"], true);
    assert!(post["responses"]["201"]["headers"]["Idempotent-Replayed"].is_object());
    for status in ["400", "403", "409", "410", "413", "422", "500", "503"] {
        let problem = &post["responses"][status];
        assert_eq!(
            problem["content"]["application/problem+json"]["schema"]["$ref"],
            "#/components/schemas/IdempotencyProblem",
            "{status}"
        );
    }
    assert!(post["responses"]["409"]["headers"]["Retry-After"].is_object());
    assert!(post["responses"]["503"]["headers"]["Retry-After"].is_object());
    assert!(
        post["responses"]["422"]["description"]
            .as_str()
            .unwrap()
            .contains("key-reused")
    );
    // The read is not covered: nothing added to it.
    let get = &doc["paths"]["/orders"]["get"];
    assert!(get["parameters"].is_null());
    assert!(get["responses"]["409"].is_null());
    let schema = &doc["components"]["schemas"]["IdempotencyProblem"];
    assert_eq!(
        schema["required"],
        serde_json::json!(["type", "title", "status"])
    );
}

#[test]
fn documenting_twice_changes_nothing_more() {
    let mut api = example::document();
    let once = api.to_json().unwrap();
    tower_idempotency::openapi::document(&mut api, &[http::Method::POST]);
    assert_eq!(api.to_json().unwrap(), once);
}

/// Under each problem profile, the document describes what the layer then answers: the
/// profile's statuses (Stripe: a reused key is `400`, no `422`), content type, body schema
/// and codes; and a served answer validates against that schema's required fields and enums.
#[tokio::test]
async fn the_document_follows_the_layers_problem_profile() {
    use std::time::Duration;
    use tower::Layer;
    use tower_idempotency::openapi::{document_with_profile, schema_name};
    use tower_idempotency::problem::Profile;
    use tower_idempotency::{IdempotencyLayer, MemoryStore};
    use utoipa::openapi::path::OperationBuilder;
    use utoipa::openapi::response::ResponseBuilder;
    use utoipa::openapi::{HttpMethod, OpenApiBuilder, PathItem, PathsBuilder};

    for profile in Profile::ALL {
        let mut api = OpenApiBuilder::new()
            .paths(
                PathsBuilder::new().path(
                    "/orders",
                    PathItem::new(
                        HttpMethod::Post,
                        OperationBuilder::new()
                            .response("201", ResponseBuilder::new().description("created")),
                    ),
                ),
            )
            .build();
        assert_eq!(
            document_with_profile(&mut api, &[http::Method::POST], profile),
            1
        );
        let doc: serde_json::Value = serde_json::from_str(&api.to_json().unwrap()).unwrap();
        let responses = &doc["paths"]["/orders"]["post"]["responses"];
        let (content_type, name) = match profile {
            Profile::Rfc9457 => ("application/problem+json", "IdempotencyProblem"),
            Profile::Stripe => ("application/json", "IdempotencyStripeError"),
            _ => ("application/json", "IdempotencyAgenticCommerceError"),
        };
        assert_eq!(schema_name(profile), name);
        let statuses: &[&str] = match profile {
            Profile::Stripe => &["400", "403", "409", "410", "413", "500", "503"],
            _ => &["400", "403", "409", "410", "413", "422", "500", "503"],
        };
        for status in statuses {
            assert_eq!(
                responses[*status]["content"][content_type]["schema"]["$ref"],
                format!("#/components/schemas/{name}"),
                "{profile:?} {status}"
            );
        }
        assert_eq!(
            responses.as_object().unwrap().len(),
            statuses.len() + 1,
            "{profile:?}: the problem statuses and 201, no others"
        );
        assert!(responses["409"]["headers"]["Retry-After"].is_object());
        assert!(responses["503"]["headers"]["Retry-After"].is_object());
        let description = |status: &str| {
            responses[status]["description"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        match profile {
            Profile::Rfc9457 => assert!(description("422").contains("key-reused")),
            Profile::Stripe => {
                assert!(description("400").contains("idempotency_key_reused"));
                assert!(description("409").contains("idempotency_key_in_use"));
            }
            _ => {
                assert!(description("400").contains("idempotency_key_required"));
                assert!(description("409").contains("idempotency_in_flight"));
                assert!(description("422").contains("idempotency_conflict"));
            }
        }

        // An answer the layer gives under this profile has what the schema requires, with
        // values from its enums.
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let svc = IdempotencyLayer::new(MemoryStore::new())
            .share_keys_across_callers()
            .problem_profile(profile)
            .layer(tower::service_fn(move |_req: Request<Body>| {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::ZERO).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(Body::from("made")))
                }
            }));
        let post = |key: &str, body: &'static str| {
            Request::post("/orders")
                .header("idempotency-key", key)
                .body(Body::from(body))
                .unwrap()
        };
        svc.clone().oneshot(post("k", "{}")).await.unwrap();
        let res = svc.clone().oneshot(post("k", "{\"sku\":2}")).await.unwrap();
        let status = res.status().as_u16().to_string();
        assert!(
            statuses.contains(&status.as_str()),
            "{profile:?}: {status} is documented"
        );
        assert_eq!(res.headers()["content-type"], content_type);
        let body: serde_json::Value =
            serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let schema = &doc["components"]["schemas"][name];
        let (object, schema) = match profile {
            Profile::Stripe => (&body["error"], &schema["properties"]["error"]),
            _ => (&body, schema),
        };
        for field in schema["required"].as_array().unwrap() {
            let field = field.as_str().unwrap();
            assert!(
                object.get(field).is_some(),
                "{profile:?}: {field} required: {body}"
            );
        }
        for (field, spec) in schema["properties"].as_object().unwrap() {
            if let Some(values) = spec["enum"].as_array() {
                assert!(
                    values.contains(&object[field]),
                    "{profile:?}: {field} = {} not in {values:?}",
                    object[field]
                );
            }
        }
    }
}

/// `document_layer` documents the layer as it is set: its own key header, optional when
/// keys are (found by review: the helpers always wrote a required `Idempotency-Key`,
/// whatever `header_name` and `missing_key` said), the key in the body for
/// `key_from_json`, nothing for `cover_when`; and `Idempotent-Replayed` on every answer the
/// operation documents (a stored `404` is replayed too), not on the layer's own refusals.
#[cfg(feature = "json")]
#[test]
fn the_document_follows_the_layers_key_settings() {
    use http::HeaderName;
    use tower_idempotency::openapi::document_layer;
    use tower_idempotency::{IdempotencyLayer, MissingKey};
    use utoipa::openapi::path::OperationBuilder;
    use utoipa::openapi::response::ResponseBuilder;
    use utoipa::openapi::{HttpMethod, OpenApi, OpenApiBuilder, PathItem, PathsBuilder};

    let api = || {
        OpenApiBuilder::new()
            .paths(
                PathsBuilder::new().path(
                    "/orders",
                    PathItem::new(
                        HttpMethod::Post,
                        OperationBuilder::new()
                            .response("201", ResponseBuilder::new().description("created"))
                            .response("404", ResponseBuilder::new().description("no such cart")),
                    ),
                ),
            )
            .build()
    };
    let json = |api: &OpenApi| serde_json::to_value(api).unwrap();

    let layer = IdempotencyLayer::default()
        .header_name(HeaderName::from_static("x-request-key"))
        .missing_key(MissingKey::Optional);
    let mut doc = api();
    assert_eq!(document_layer(&mut doc, &layer), 1);
    let post = &json(&doc)["paths"]["/orders"]["post"];
    let params = post["parameters"].as_array().unwrap();
    assert_eq!(params.len(), 1, "{params:?}");
    assert_eq!(params[0]["name"], "x-request-key");
    assert_ne!(params[0]["required"], true, "an optional key");
    for status in ["201", "404"] {
        assert!(
            post["responses"][status]["headers"]["Idempotent-Replayed"].is_object(),
            "{status}"
        );
    }
    assert!(post["responses"]["409"]["headers"]["Idempotent-Replayed"].is_null());
    let once = serde_json::to_string(&doc).unwrap();
    document_layer(&mut doc, &layer);
    assert_eq!(serde_json::to_string(&doc).unwrap(), once, "twice is once");

    let body_keys = IdempotencyLayer::default().key_from_json("/id");
    let mut doc = api();
    document_layer(&mut doc, &body_keys);
    let post = &json(&doc)["paths"]["/orders"]["post"];
    assert!(post["parameters"].as_array().is_none_or(|p| p.is_empty()));
    assert!(post["description"].as_str().unwrap().contains("`/id`"));

    let by_function = IdempotencyLayer::default().cover_when(|_| true);
    let mut doc = api();
    assert_eq!(document_layer(&mut doc, &by_function), 0);
}
