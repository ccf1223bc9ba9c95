//! Serves the generated orders service behind the idempotency layer until Ctrl-C.

use orders_grpc::{OrderBook, layer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("LISTEN_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:3003".to_owned())
        .parse()?;
    let layer = layer();
    let work = layer.detached_work();
    println!("orders gRPC service on {addr}");
    tonic::transport::Server::builder()
        .layer(layer)
        .add_service(OrderBook::default().into_service())
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Let operations whose clients left finish and be stored.
    let _ = work.shutdown(std::time::Duration::from_secs(10)).await;
    Ok(())
}
