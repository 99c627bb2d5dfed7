//! How shoal's clients (`shoal`, `nodelet`) trust an apiserver, and what they say when
//! they do not.
//!
//! Trust is the platform's roots (`/etc/ssl/certs` and the like), the Mozilla roots built
//! into the binary (a board without a CA bundle still reaches a public server), and the CA
//! certificates of `--ca-file`: what an on-premises fleet with its own CA needs.
//!
//! A refused certificate is a [`CertificateProblem`]: which name was asked for, which
//! names the certificate holds, who issued it, and what to pass. Those facts come from the
//! certificate the server presented, read by a second handshake that records it and then
//! aborts (nothing is ever sent over it), because rustls's error only says "unknown
//! issuer".

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// The CA certificates in a PEM file (one or several), to trust besides the platform's.
pub fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("--ca-file {}: cannot read it: {e}", path.display()))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        format!(
            "--ca-file {}: not a PEM certificate bundle: {e}",
            path.display()
        )
    })?;
    if certificates.is_empty() {
        return Err(format!(
            "--ca-file {}: no certificate in it (expected PEM blocks starting with \
             `-----BEGIN CERTIFICATE-----`)",
            path.display()
        ));
    }
    Ok(certificates)
}

/// Why a TLS connection to the apiserver failed, when its certificate was the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateProblem {
    /// What is wrong, with the names and the issuer.
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

impl std::fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.hint)
    }
}

/// The rustls error somewhere in `error`'s chain of causes.
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = inside(e) {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// `e` itself as a rustls error, or the one an `io::Error` wraps (perhaps in another
/// `io::Error`): `source()` skips the wrapped error and goes to its own source.
fn inside<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(found) = e.downcast_ref::<rustls::Error>() {
        return Some(found);
    }
    let wrapped = e.downcast_ref::<io::Error>()?.get_ref()?;
    inside(wrapped)
}

/// What the server presented: its certificate's subject, issuer, names and validity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presented {
    /// The subject's distinguished name.
    pub subject: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// DNS names and IP addresses of its subjectAltName extension.
    pub names: Vec<String>,
    /// Its `notAfter`, RFC 2822.
    pub not_after: String,
}

/// Reads the certificate `url`'s server presents (the end entity), or why it could not.
/// A blocking call of at most about `timeout` twice (connect, handshake).
pub fn presented(url: &str, timeout: Duration) -> Result<Presented, String> {
    let url = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    let host = url.host_str().ok_or("the URL has no host")?.to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    // `[::1]` in a URL is `::1` as a server name.
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name = ServerName::try_from(bare.clone()).map_err(|e| format!("{host}: {e}"))?;
    let recorder = Arc::new(Recorder::default());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .dangerous()
    .with_custom_certificate_verifier(recorder.clone())
    .with_no_client_auth();
    let address = (bare.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let mut tcp = TcpStream::connect_timeout(&address, timeout).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let mut connection =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    // Runs the handshake until the recorder has seen the certificate and refused it.
    while connection.is_handshaking() {
        if let Err(e) = connection.complete_io(&mut tcp) {
            if recorder.certificate().is_some() {
                break;
            }
            return Err(e.to_string());
        }
    }
    let der = recorder
        .certificate()
        .ok_or("the server presented no certificate")?;
    describe(&der)
}

fn describe(der: &[u8]) -> Result<Presented, String> {
    use x509_parser::extensions::GeneralName;
    let (_, certificate) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable: {e}"))?;
    let names = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_string()),
                    GeneralName::IPAddress(bytes) => ip_of(bytes),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Presented {
        subject: certificate.subject().to_string(),
        issuer: certificate.issuer().to_string(),
        names,
        not_after: certificate
            .validity()
            .not_after
            .to_rfc2822()
            .unwrap_or_default(),
    })
}

fn ip_of(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv4Addr::from(b).to_string()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv6Addr::from(b).to_string()),
        _ => None,
    }
}

/// Accepts no certificate: it keeps the one presented and refuses it, so the handshake
/// that reads it can never carry data.
#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Option<Vec<u8>>>,
}

impl Recorder {
    fn certificate(&self) -> Option<Vec<u8>> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(end_entity.to_vec());
        Err(rustls::Error::General(
            "certificate recorded for a diagnosis".into(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("never verifies".into()))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("never verifies".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why the server's certificate was refused, when that is what `error` (a failed request)
/// comes from. Cheap: it only reads the error.
pub fn refused_certificate(error: &(dyn std::error::Error + 'static)) -> Option<CertificateError> {
    match rustls_error(error)? {
        rustls::Error::InvalidCertificate(reason) => Some(reason.clone()),
        _ => None,
    }
}

/// `reason` described with what `url`'s server presented, read by a second handshake
/// (blocking, a few seconds at most).
pub fn diagnose(reason: &CertificateError, url: &str) -> CertificateProblem {
    let host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| url.to_string());
    let presented = presented(url, Duration::from_secs(3));
    explain(reason, &host, presented.as_ref().ok())
}

/// The certificate problem behind `error` (a failed request to `url`), or `None` when the
/// certificate was not the reason. Blocking when it was (see [`diagnose`]).
pub fn certificate_problem(
    error: &(dyn std::error::Error + 'static),
    url: &str,
) -> Option<CertificateProblem> {
    refused_certificate(error).map(|reason| diagnose(&reason, url))
}

/// The words for a refused certificate: pure, so each case is tested without a server.
pub fn explain(
    reason: &CertificateError,
    host: &str,
    presented: Option<&Presented>,
) -> CertificateProblem {
    let issuer = presented
        .map(|p| format!("`{}`", p.issuer))
        .unwrap_or_else(|| "a CA".into());
    let names = presented
        .map(|p| {
            if p.names.is_empty() {
                format!("no subjectAltName (subject `{}`)", p.subject)
            } else {
                p.names.join(", ")
            }
        })
        .unwrap_or_else(|| "other names".into());
    match reason {
        CertificateError::UnknownIssuer => CertificateProblem {
            message: format!(
                "TLS certificate problem: the certificate {host} presented is issued by {issuer}, \
                 which this client does not trust (unknown issuer)"
            ),
            hint: "pass --ca-file FILE with that CA's certificate (PEM), or SHOAL_CA_FILE"
                .into(),
        },
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            CertificateProblem {
                message: format!(
                    "TLS certificate problem: the certificate {host} presented does not hold \
                     the name `{host}`; it holds {names}"
                ),
                hint: "connect with --server using a name the certificate holds, or give \
                       the apiserver a certificate (--tls-cert) that holds this one"
                    .into(),
            }
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            CertificateProblem {
                message: format!(
                    "TLS certificate problem: the certificate {host} presented has expired{}",
                    presented
                        .map(|p| format!(" (not after {})", p.not_after))
                        .unwrap_or_default()
                ),
                hint: "renew the apiserver's certificate (--tls-cert), and check this \
                       machine's clock"
                    .into(),
            }
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            CertificateProblem {
                message: format!("TLS certificate problem: the certificate {host} presented is not valid yet"),
                hint: "check this machine's clock (a board without a real-time clock starts in 1970)"
                    .into(),
            }
        }
        other => CertificateProblem {
            message: format!(
                "TLS certificate problem: the certificate {host} presented (issued by {issuer}) was \
                 refused: {other:?}"
            ),
            hint: "check the apiserver's --tls-cert, and pass --ca-file FILE with the CA \
                   that issued it"
                .into(),
        },
    }
}

#[cfg(test)]
mod tests;

/// A private CA and a server certificate it issued, for tests.
#[cfg(feature = "testing")]
pub mod testing {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };

    /// PEM texts of a CA and of a server certificate and key it issued.
    pub struct PrivateCa {
        /// The CA's certificate: what `--ca-file` takes.
        pub ca_pem: String,
        /// The server's certificate: what `--tls-cert` takes.
        pub cert_pem: String,
        /// The server's key: what `--tls-key` takes.
        pub key_pem: String,
    }

    /// Paths of the three PEM files [`PrivateCa::write_to`] wrote.
    pub struct Files {
        /// The CA's certificate.
        pub ca: String,
        /// The server's certificate.
        pub cert: String,
        /// The server's key.
        pub key: String,
    }

    impl PrivateCa {
        /// Writes `ca.pem`, `cert.pem` and `key.pem` into `dir`.
        pub fn write_to(&self, dir: &std::path::Path) -> Files {
            let write = |name: &str, text: &str| {
                let path = dir.join(name);
                std::fs::write(&path, text).expect("write a PEM file");
                path.to_str().expect("a UTF-8 path").to_string()
            };
            Files {
                ca: write("ca.pem", &self.ca_pem),
                cert: write("cert.pem", &self.cert_pem),
                key: write("key.pem", &self.key_pem),
            }
        }
    }

    /// A CA called `ca_name` and a certificate for `names` (DNS names or IP addresses).
    pub fn private_ca(ca_name: &str, names: &[&str]) -> PrivateCa {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.distinguished_name.push(DnType::CommonName, ca_name);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let mut server =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("server parameters");
        server.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        let key = KeyPair::generate().expect("server key");
        let cert = server.signed_by(&key, &issuer).expect("server certificate");
        PrivateCa {
            ca_pem: issuer.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}
