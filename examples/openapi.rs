//! An OpenAPI document that tells clients the idempotency contract, served beside the
//! routes it describes.
//!
//! ```text
//! cargo run --example openapi --features openapi
//! curl localhost:3004/openapi.json
//! ```
//!
//! `POST /orders` is covered by the layer; `document` adds the `Idempotency-Key` header, the
//! `Idempotent-Replayed` response header and the problem responses to it (and to every
//! `POST` and `PATCH` operation), and leaves `GET /orders` as it is. Listens on
//! `LISTEN_ADDR` (default `127.0.0.1:3004`).

use axum::routing::{get, post};
use axum::{Json, Router};
use http::Method;
use tower_idempotency::{IdempotencyLayer, MemoryStore};
use utoipa::openapi::path::OperationBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::{HttpMethod, InfoBuilder, OpenApi, OpenApiBuilder, PathItem, PathsBuilder};

/// The service's document, with the layer's contract on the operations it covers.
pub fn document() -> OpenApi {
    let create = OperationBuilder::new()
        .summary(Some("Create an order"))
        .response("201", ResponseBuilder::new().description("The order."));
    let list = OperationBuilder::new()
        .summary(Some("List the orders"))
        .response("200", ResponseBuilder::new().description("The orders."));
    let mut orders = PathItem::new(HttpMethod::Post, create);
    orders.get = Some(list.build());
    let mut api = OpenApiBuilder::new()
        .info(InfoBuilder::new().title("orders").version("1.0.0"))
        .paths(PathsBuilder::new().path("/orders", orders))
        .build();
    // The methods the layer covers (its default).
    tower_idempotency::openapi::document(&mut api, &[Method::POST, Method::PATCH]);
    api
}

/// The routes, and the document at `/openapi.json`.
pub fn app() -> Router {
    let api = document();
    Router::new()
        .route(
            "/orders",
            post(|| async { (http::StatusCode::CREATED, "{\"id\":1}") }).get(|| async { "[]" }),
        )
        .layer(IdempotencyLayer::new(MemoryStore::new()).share_keys_across_callers())
        .route(
            "/openapi.json",
            get(move || async move { Json(api.clone()) }),
        )
}

#[allow(dead_code)]
#[tokio::main]
async fn main() {
    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:3004".to_owned());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("error: cannot listen on {addr}: {err}");
            std::process::exit(1);
        }
    };
    println!("orders with their OpenAPI document at http://{addr}/openapi.json");
    if let Err(err) = axum::serve(listener, app()).await {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
