//! The tutorial's `helloworld.Greeter` gRPC service, generated from `proto/helloworld.proto`: the
//! server half for the `demo-app` binary, the client half for tests that call it.

/// The generated `helloworld` package: messages, `greeter_server` and `greeter_client`.
pub mod hello {
    tonic::include_proto!("helloworld");
}
