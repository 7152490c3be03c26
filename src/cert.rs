//! A development PKI: one CA, a gateway certificate and a client certificate.
//!
//! `sudp cert --out DIR` writes
//!
//! ```text
//! ca.pem        the CA certificate: the shim's trust anchor, and the gateway's client CA
//! gateway.pem   gateway certificate (server auth), signed by the CA
//! gateway.key   its private key (mode 0600)
//! client.pem    client certificate (client auth), signed by the CA
//! client.key    its private key (mode 0600)
//! ```
//!
//! The CA's private key is never written: once the two leaves are signed it is dropped, so
//! a forgotten development directory cannot be used to mint further certificates. Run the
//! command again to issue a fresh set (it overwrites the files).
//!
//! All keys are ECDSA P-256. The CA is valid for ten years and allows no intermediates
//! (path length 0); leaves are valid for 825 days. Every certificate's validity starts an
//! hour in the past to tolerate clock skew between machines.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

use crate::tls;

/// Subject alternative names of the gateway certificate when none are given.
pub const DEFAULT_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Name (CN and DNS SAN) of the client certificate when none is given.
pub const DEFAULT_CLIENT_NAME: &str = "sudp-client";

/// A freshly generated development PKI, all in PEM.
///
/// `Debug` is deliberately not derived: it would print the private keys.
#[derive(Clone)]
pub struct DevPki {
    /// The CA certificate.
    pub ca_pem: String,
    /// The gateway's certificate, signed by the CA.
    pub gateway_cert_pem: String,
    /// The gateway's private key (PKCS#8).
    pub gateway_key_pem: String,
    /// The client's certificate, signed by the CA.
    pub client_cert_pem: String,
    /// The client's private key (PKCS#8).
    pub client_key_pem: String,
}

impl DevPki {
    /// The CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        one_cert(&self.ca_pem)
    }

    /// The gateway's certificate chain (its certificate alone), DER.
    pub fn gateway_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![one_cert(&self.gateway_cert_pem)]
    }

    /// The gateway's private key, DER.
    pub fn gateway_key(&self) -> PrivateKeyDer<'static> {
        one_key(&self.gateway_key_pem)
    }

    /// The client's certificate chain (its certificate alone), DER.
    pub fn client_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![one_cert(&self.client_cert_pem)]
    }

    /// The client's private key, DER.
    pub fn client_key(&self) -> PrivateKeyDer<'static> {
        one_key(&self.client_key_pem)
    }

    /// SHA-256 of the gateway certificate: the value for a client's `--pin`.
    pub fn gateway_pin(&self) -> [u8; 32] {
        tls::cert_sha256(&one_cert(&self.gateway_cert_pem))
    }
}

/// Generates a CA, a gateway certificate for `sans` and a client certificate named
/// `client_name`.
///
/// Each SAN that parses as an IP address becomes an IP SAN, any other a DNS SAN; an empty
/// `sans` means [`DEFAULT_SANS`], an empty `client_name` means [`DEFAULT_CLIENT_NAME`].
/// Fails if a name is not valid in a certificate (a DNS SAN must be ASCII).
pub fn generate(sans: &[String], client_name: &str) -> Result<DevPki, rcgen::Error> {
    let mut ca = DevCa::new()?;
    let (gateway_cert_pem, gateway_key_pem) = ca.gateway(sans)?;
    let client_name = if client_name.is_empty() {
        DEFAULT_CLIENT_NAME
    } else {
        client_name
    };
    let client = ca.client(client_name)?;
    Ok(DevPki {
        ca_pem: ca.ca_pem,
        gateway_cert_pem,
        gateway_key_pem,
        client_cert_pem: client.cert_pem,
        client_key_pem: client.key_pem,
    })
}

/// A development CA that keeps its key in memory: issues further client certificates and
/// signs certificate revocation lists (tests, demos). Its key is never written anywhere;
/// [`generate`] uses one and drops it.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    now: OffsetDateTime,
    not_before: OffsetDateTime,
}

/// A certificate [`DevCa`] issued, with its key and serial number.
#[derive(Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
    /// Its serial number, what a CRL names.
    pub serial: u64,
}

impl Issued {
    /// The certificate chain (the certificate alone), DER.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![one_cert(&self.cert_pem)]
    }

    /// The private key, DER.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        one_key(&self.key_pem)
    }
}

impl DevCa {
    /// A fresh CA (ECDSA P-256, ten years, no intermediates, may sign certificates and CRLs).
    pub fn new() -> Result<DevCa, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        let not_before = now - Duration::hours(1);
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = dn("sudp development CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = not_before;
        ca.not_after = now + Duration::days(3650);
        let ca_cert = ca.self_signed(&ca_key)?;
        Ok(DevCa {
            issuer: Issuer::new(ca, ca_key),
            ca_pem: ca_cert.pem(),
            now,
            not_before,
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        one_cert(&self.ca_pem)
    }

    /// A gateway (server auth) certificate for `sans` ([`DEFAULT_SANS`] if empty): PEM
    /// certificate and key.
    pub fn gateway(&mut self, sans: &[String]) -> Result<(String, String), rcgen::Error> {
        let sans: Vec<String> = if sans.is_empty() {
            DEFAULT_SANS.iter().map(|s| s.to_string()).collect()
        } else {
            sans.to_vec()
        };
        let mut gw = self.leaf(ExtendedKeyUsagePurpose::ServerAuth);
        // Indexing cannot fail: `sans` is the caller's non-empty list or the defaults.
        gw.distinguished_name = dn(&sans[0]);
        gw.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = gw.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client (client auth) certificate named `name` (CN and DNS SAN).
    pub fn client(&mut self, name: &str) -> Result<Issued, rcgen::Error> {
        let mut cl = self.leaf(ExtendedKeyUsagePurpose::ClientAuth);
        cl.distinguished_name = dn(name);
        cl.subject_alt_names = vec![SanType::DnsName(name.try_into()?)];
        let serial = rand::random::<u64>() >> 1;
        cl.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = cl.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// A CRL, PEM, revoking the certificates with these serial numbers; valid from an hour
    /// ago for 30 days.
    pub fn crl(&self, revoked: &[u64]) -> Result<String, rcgen::Error> {
        let params = CertificateRevocationListParams {
            this_update: self.not_before,
            next_update: self.now + Duration::days(30),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&serial| RevokedCertParams {
                    serial_number: SerialNumber::from(serial),
                    revocation_time: self.not_before,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer)?.pem()
    }

    fn leaf(&self, eku: ExtendedKeyUsagePurpose) -> CertificateParams {
        leaf(self.not_before, self.now, eku)
    }
}

/// A development PKI with the default names, for tests and benchmarks.
pub fn ephemeral() -> DevPki {
    // Invariant: the default names are valid certificate names and ECDSA P-256 key
    // generation fails only if the system RNG does, which nothing here can recover from.
    generate(&[], DEFAULT_CLIENT_NAME).expect("default development PKI")
}

/// Writes `pki` into `dir` (created if missing) as `ca.pem`, `gateway.pem`, `gateway.key`,
/// `client.pem` and `client.key`, overwriting existing files. On unix the keys are created
/// with mode 0600. Returns the paths written, in that order.
pub fn write(pki: &DevPki, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let files = [
        ("ca.pem", &pki.ca_pem, false),
        ("gateway.pem", &pki.gateway_cert_pem, false),
        ("gateway.key", &pki.gateway_key_pem, true),
        ("client.pem", &pki.client_cert_pem, false),
        ("client.key", &pki.client_key_pem, true),
    ];
    let mut written = Vec::with_capacity(files.len());
    for (name, contents, secret) in files {
        let path = dir.join(name);
        write_file(&path, contents.as_bytes(), secret)?;
        written.push(path);
    }
    Ok(written)
}

/// Command-line arguments of `sudp cert`.
#[derive(Debug, clap::Args)]
pub struct CertArgs {
    /// Directory to write ca.pem, gateway.pem, gateway.key, client.pem and client.key into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Subject alternative name of the gateway certificate (IP address or DNS name);
    /// repeatable. Default: localhost, 127.0.0.1, ::1.
    #[arg(long = "san", value_name = "NAME")]
    pub sans: Vec<String>,
    /// Name (CN and DNS SAN) of the client certificate.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_CLIENT_NAME)]
    pub client_name: String,
}

/// Runs `sudp cert`: generates a development PKI, writes it and prints the files written
/// and the gateway certificate's pin.
pub fn run_cert(args: CertArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;

    let pki = generate(&args.sans, &args.client_name).context("generating certificates")?;
    let written =
        write(&pki, &args.out).with_context(|| format!("writing certificates to {}", args.out.display()))?;
    for path in &written {
        println!("wrote {}", path.display());
    }
    println!(
        "gateway certificate SHA-256 pin: {}",
        tls::pin_hex(&pki.gateway_pin())
    );
    Ok(())
}

/// Parameters shared by both leaves.
fn leaf(not_before: OffsetDateTime, now: OffsetDateTime, eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    p.use_authority_key_identifier_extension = true;
    p.not_before = not_before;
    p.not_after = now + Duration::days(825);
    p
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn san(name: &str) -> Result<SanType, rcgen::Error> {
    Ok(match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into()?),
    })
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    // `mode` applies only when the file is created; tighten a key file that already existed
    // before writing the new key into it.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    file.write_all(contents)?;
    file.sync_all()
}

fn one_cert(pem: &str) -> CertificateDer<'static> {
    // Invariant: `DevPki` PEM comes from `generate`, which writes exactly one well-formed
    // certificate per field; `parse_certs` never returns an empty list.
    let mut certs = tls::parse_certs(pem.as_bytes(), "dev PKI").expect("generated PEM");
    certs.swap_remove(0)
}

fn one_key(pem: &str) -> PrivateKeyDer<'static> {
    // Invariant: as in `one_cert`, the key PEM was produced by rcgen.
    tls::parse_key(pem.as_bytes(), "dev PKI").expect("generated PEM")
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn der(pem: &str) -> Vec<u8> {
        one_cert(pem).as_ref().to_vec()
    }

    #[test]
    fn default_sans_and_usages() {
        let pki = ephemeral();
        let bytes = der(&pki.gateway_cert_pem);
        let (_, gw) = x509_parser::parse_x509_certificate(&bytes).unwrap();
        let sans = &gw
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert!(matches!(sans[0], GeneralName::DNSName("localhost")));
        assert!(matches!(sans[1], GeneralName::IPAddress(&[127, 0, 0, 1])));
        assert!(matches!(sans[2], GeneralName::IPAddress(ip) if ip.len() == 16));
        let eku = gw.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!gw.is_ca());

        let bytes = der(&pki.ca_pem);
        let (_, ca) = x509_parser::parse_x509_certificate(&bytes).unwrap();
        assert!(ca.is_ca());
        assert!(ca.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert_eq!(gw.issuer(), ca.subject());

        let bytes = der(&pki.client_cert_pem);
        let (_, cl) = x509_parser::parse_x509_certificate(&bytes).unwrap();
        let eku = cl.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let cn = cl.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), DEFAULT_CLIENT_NAME);
    }

    #[test]
    fn custom_names() {
        let pki = generate(&["gw.example".to_string(), "10.1.2.3".to_string()], "alice").unwrap();
        let bytes = der(&pki.gateway_cert_pem);
        let (_, gw) = x509_parser::parse_x509_certificate(&bytes).unwrap();
        let sans = &gw
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(sans.len(), 2);
        assert!(matches!(sans[0], GeneralName::DNSName("gw.example")));
        assert!(matches!(sans[1], GeneralName::IPAddress(&[10, 1, 2, 3])));
        assert_eq!(
            tls::cert_identity(&one_cert(&pki.client_cert_pem)).as_deref(),
            Some("alice")
        );
    }

    #[test]
    fn non_ascii_dns_name_is_an_error() {
        assert!(generate(&["bücher.example".to_string()], "x").is_err());
    }

    #[test]
    fn write_creates_files_and_protects_keys() {
        let dir = std::env::temp_dir().join(format!("sudp-cert-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let pki = ephemeral();
        let written = write(&pki, &dir.join("nested")).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            ["ca.pem", "gateway.pem", "gateway.key", "client.pem", "client.key"]
        );
        assert_eq!(fs::read_to_string(&written[2]).unwrap(), pki.gateway_key_pem);
        // Loading through the TLS layer round-trips.
        assert_eq!(tls::load_certs(&written[1]).unwrap(), pki.gateway_chain());
        tls::load_key(&written[4]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&written[2]), 0o600);
            assert_eq!(mode(&written[4]), 0o600);
            // Rewriting over a key file left world-readable tightens it again.
            fs::set_permissions(&written[2], fs::Permissions::from_mode(0o644)).unwrap();
            write(&pki, &dir.join("nested")).unwrap();
            assert_eq!(mode(&written[2]), 0o600);
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dev_ca_issues_clients_and_signs_crls() {
        let mut ca = DevCa::new().unwrap();
        let a = ca.client("ops").unwrap();
        let b = ca.client("ops").unwrap();
        assert_ne!(a.serial, b.serial);
        assert_eq!(tls::cert_identity(&a.chain()[0]).as_deref(), Some("ops"));
        let crl = ca.crl(&[a.serial]).unwrap();
        let crls = tls::parse_crls(crl.as_bytes(), "crl").unwrap();
        assert_eq!(crls.len(), 1);
        assert!(matches!(
            tls::parse_crls(ca.ca_pem().as_bytes(), "ca.pem"),
            Err(tls::TlsError::NoCrl { .. })
        ));
    }

    #[test]
    fn each_run_is_fresh() {
        let (a, b) = (ephemeral(), ephemeral());
        assert_ne!(a.gateway_pin(), b.gateway_pin());
        assert_ne!(a.ca_pem, b.ca_pem);
    }
}
