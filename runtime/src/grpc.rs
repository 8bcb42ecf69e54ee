//! gRPC server reflection (v1 and v1alpha) and grpc.health.v1, the way an
//! operator with `grpcurl` expects to find them on every tabby server.
use crate::Result;
use tonic::service::Routes;
use tonic_health::server::HealthReporter;

/// The introspection services of one gRPC server.
pub struct Introspection {
    /// Sets the serving status of the server's services.
    pub health: HealthReporter,
    /// grpc.health.v1.Health and reflection v1 and v1alpha, ready for
    /// `Server::builder().add_routes(..)`; add the server's own services
    /// to the router that returns.
    pub routes: Routes,
}

/// Builds health and reflection for a server that serves `services` (full
/// names, e.g. `tabby.v1.IpamAdmin`) described by `descriptor_set` (an
/// encoded `FileDescriptorSet`).
///
/// Reflection lists only `services` and `grpc.health.v1.Health`: one
/// descriptor set usually describes the services of several servers.
pub fn introspection(descriptor_set: &'static [u8], services: &[&str]) -> Result<Introspection> {
    let configure = || {
        let b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(descriptor_set)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        services
            .iter()
            .fold(b, |b, s| b.with_service_name(*s))
            .with_service_name("grpc.health.v1.Health")
    };
    let v1 = configure().build_v1()?;
    let v1alpha = configure().build_v1alpha()?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    let routes = Routes::new(health_svc).add_service(v1).add_service(v1alpha);
    Ok(Introspection { health, routes })
}

#[cfg(test)]
mod tests {
    #[test]
    fn rejects_a_bad_descriptor_set() {
        assert!(super::introspection(b"\xff\xff", &["x.Y"]).is_err());
    }

    #[test]
    fn builds_with_the_health_descriptors() {
        let i = super::introspection(tonic_health::pb::FILE_DESCRIPTOR_SET, &[]);
        assert!(i.is_ok());
    }
}
