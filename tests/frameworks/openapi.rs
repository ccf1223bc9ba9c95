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
