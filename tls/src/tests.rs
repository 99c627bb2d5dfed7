use super::*;

fn presented() -> Presented {
    Presented {
        subject: "CN=apiserver.lan".into(),
        issuer: "CN=Acme Fleet CA".into(),
        names: vec!["apiserver.lan".into(), "10.0.0.5".into()],
        not_after: "Tue, 1 Dec 2026 00:00:00 +0000".into(),
    }
}

#[test]
fn an_unknown_issuer_names_the_issuer_and_says_to_pass_the_ca_file() {
    let problem = explain(
        &CertificateError::UnknownIssuer,
        "10.0.0.5",
        Some(&presented()),
    );
    assert!(
        problem.message.starts_with("TLS certificate problem"),
        "{problem}"
    );
    assert!(problem.message.contains("`CN=Acme Fleet CA`"), "{problem}");
    assert!(problem.message.contains("unknown issuer"), "{problem}");
    assert!(problem.hint.contains("--ca-file"), "{problem}");
    // Without the presented certificate (the second handshake failed) it still says what.
    let bare = explain(&CertificateError::UnknownIssuer, "10.0.0.5", None);
    assert!(bare.message.contains("does not trust"), "{bare}");
    assert!(bare.hint.contains("--ca-file"), "{bare}");
}

#[test]
fn a_name_mismatch_lists_the_names_the_certificate_holds() {
    let problem = explain(
        &CertificateError::NotValidForName,
        "apiserver",
        Some(&presented()),
    );
    assert!(
        problem
            .message
            .contains("does not hold the name `apiserver`"),
        "{problem}"
    );
    assert!(
        problem.message.contains("apiserver.lan, 10.0.0.5"),
        "{problem}"
    );
    assert!(problem.hint.contains("--server"), "{problem}");
}

#[test]
fn an_expired_or_early_certificate_points_at_renewal_or_the_clock() {
    let expired = explain(&CertificateError::Expired, "h", Some(&presented()));
    assert!(expired.message.contains("expired"), "{expired}");
    assert!(expired.message.contains("2026"), "{expired}");
    let early = explain(&CertificateError::NotValidYet, "h", None);
    assert!(early.hint.contains("clock"), "{early}");
    let other = explain(&CertificateError::BadSignature, "h", Some(&presented()));
    assert!(other.message.contains("BadSignature"), "{other}");
    assert!(other.message.contains("Acme Fleet CA"), "{other}");
}

#[test]
fn a_rustls_error_is_found_inside_an_io_error() {
    let io = io::Error::new(
        io::ErrorKind::InvalidData,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
    );
    #[derive(Debug)]
    struct Outer(io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("request failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    // As hyper wraps it: an io::Error holding the io::Error that holds the rustls error.
    let outer = Outer(io::Error::other(io));
    assert!(matches!(
        rustls_error(&outer),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
    ));
    let unrelated = io::Error::other("connection reset");
    assert!(rustls_error(&unrelated).is_none());
}

#[test]
fn a_ca_file_that_is_missing_empty_or_not_pem_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("shoal-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = read_ca_file(&dir.join("nope.pem")).unwrap_err();
    assert!(missing.contains("cannot read it"), "{missing}");
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let error = read_ca_file(&empty).unwrap_err();
    assert!(error.contains("no certificate in it"), "{error}");
    let text = dir.join("text.pem");
    std::fs::write(&text, "hello\n").unwrap();
    assert!(read_ca_file(&text).is_err());
    let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
    let good = dir.join("ca.pem");
    std::fs::write(&good, format!("{}{}", ca.cert.pem(), ca.cert.pem())).unwrap();
    assert_eq!(read_ca_file(&good).unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn describe_reads_subject_issuer_and_names() {
    let ca = rcgen::generate_simple_self_signed(vec!["a.lan".into(), "10.1.2.3".into()]).unwrap();
    let described = describe(ca.cert.der()).unwrap();
    assert_eq!(described.names, vec!["a.lan", "10.1.2.3"]);
    assert!(!described.issuer.is_empty());
    assert!(!described.not_after.is_empty());
    assert!(describe(b"not a certificate").is_err());
}
