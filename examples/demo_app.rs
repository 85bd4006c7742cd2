//! Placeholder; the demo app is written next.
tonic::include_proto!("helloworld");
fn main() {}
