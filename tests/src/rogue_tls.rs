//! A hostile TLS 1.3 server for tests: a broker impersonator that skips, reorders or forges the
//! server-authentication messages, and counts the application bytes a client sends it anyway.
//!
//! It speaks exactly what the device SDK offers (TLS_AES_128_GCM_SHA256, a secp256r1 key share,
//! no HelloRetryRequest, no dummy ChangeCipherSpec) and follows RFC 8446 otherwise: the key
//! schedule, Finished MACs and CertificateVerify signatures are computed correctly, so the *only*
//! thing wrong in each [`Mode`] is the one omission or reordering it names. A client that is fooled
//! completes the handshake and sends MQTT; [`Report::app_bytes`] counts those bytes.
//!
//! One connection per server; the server thread ends when the client closes or after a read
//! timeout, and [`RogueServer::finish`] returns what it saw.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes128Gcm;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{DerSignature, SigningKey};
use sha2::{Digest, Sha256};

/// The DER of the first certificate in a PEM file (a broker's file may carry its chain after
/// the leaf).
pub fn first_certificate_der(pem: &str) -> Vec<u8> {
    const END: &str = "-----END CERTIFICATE-----";
    let end = pem.find(END).expect("a PEM certificate") + END.len();
    let (label, der) = p256::pkcs8::der::pem::decode_vec(&pem.as_bytes()[..end]).expect("valid PEM");
    assert_eq!(label, "CERTIFICATE");
    der
}

/// What the server sends after ServerHello (always: EncryptedExtensions, CertificateRequest
/// first, Finished last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No Certificate and no CertificateVerify.
    NoCertificate,
    /// The real broker certificate, but no CertificateVerify (the attacker lacks the key).
    CertificateWithoutVerify,
    /// The real broker certificate and a CertificateVerify signed by another key.
    VerifyByOtherKey,
    /// A CertificateVerify (by the right key) before the Certificate.
    VerifyBeforeCertificate,
    /// A correct Certificate and CertificateVerify, then a second Certificate (a swap after the
    /// proof).
    SecondCertificate,
    /// A correct server: Certificate and CertificateVerify by the broker key. It answers the
    /// client's first MQTT packet with CONNACK 0.
    Correct,
}

/// What the server saw from the client.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// The client's Finished arrived (the handshake completed on the client's side).
    pub client_finished: bool,
    /// Whether the client's Certificate message carried a certificate, if the message came.
    pub client_sent_certificate: Option<bool>,
    /// Application-data bytes received after the handshake (MQTT, if the client was fooled).
    pub app_bytes: usize,
    /// An alert the client sent (level, description), if any.
    pub alert: Option<(u8, u8)>,
    /// The client hung up while the server was still sending its flight (it refused early).
    pub closed_during_server_flight: bool,
    /// Why the server stopped early, if it did (protocol error on its side).
    pub error: Option<String>,
}

/// A one-connection hostile server listening on loopback.
#[derive(Debug)]
pub struct RogueServer {
    /// Where it listens (127.0.0.1, a port chosen by the OS).
    pub addr: SocketAddr,
    thread: JoinHandle<Report>,
}

impl RogueServer {
    /// Starts a server presenting `cert_der` (the broker's certificate) in `mode`; `key` is the
    /// broker's P-256 key, used only by the modes that sign with it.
    pub fn start(mode: Mode, cert_der: Vec<u8>, key: SigningKey) -> RogueServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let thread = std::thread::spawn(move || {
            let mut report = Report::default();
            match listener.accept() {
                Ok((tcp, _)) => match serve(tcp, mode, &cert_der, &key, &mut report) {
                    Err(e) if e.starts_with(CLOSED) => report.closed_during_server_flight = true,
                    Err(e) => report.error = Some(e),
                    Ok(()) => {}
                },
                Err(e) => report.error = Some(format!("accept: {e}")),
            }
            report
        });
        RogueServer { addr, thread }
    }

    /// Waits for the connection to end and returns what the server saw.
    pub fn finish(self) -> Report {
        self.thread.join().expect("rogue server thread panicked")
    }
}

/// Error prefix for a write the client's close made fail.
const CLOSED: &str = "client closed";
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const CHANGE_CIPHER_SPEC: u8 = 20;

/// One direction's record protection.
struct Keys {
    aead: Aes128Gcm,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn from_secret(secret: &[u8]) -> Keys {
        let key: [u8; 16] = expand_label(secret, b"key", &[]);
        let iv: [u8; 12] = expand_label(secret, b"iv", &[]);
        Keys { aead: Aes128Gcm::new(&key.into()), iv, seq: 0 }
    }

    fn nonce(&mut self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        n
    }

    fn seal(&mut self, content_type: u8, content: &[u8]) -> Vec<u8> {
        let mut inner = content.to_vec();
        inner.push(content_type);
        let len = u16::try_from(inner.len() + 16).expect("record fits");
        let mut header = vec![APPLICATION_DATA, 3, 3];
        header.extend_from_slice(&len.to_be_bytes());
        let nonce = self.nonce();
        let sealed =
            self.aead.encrypt(&nonce.into(), Payload { msg: &inner, aad: &header }).expect("AES-GCM seal");
        header.extend_from_slice(&sealed);
        header
    }

    fn open(&mut self, header: &[u8], body: &[u8]) -> Result<(u8, Vec<u8>), String> {
        let nonce = self.nonce();
        let mut inner = self
            .aead
            .decrypt(&nonce.into(), Payload { msg: body, aad: header })
            .map_err(|_| "client record does not decrypt".to_owned())?;
        while inner.last() == Some(&0) {
            inner.pop();
        }
        let ty = inner.pop().ok_or("empty inner plaintext")?;
        Ok((ty, inner))
    }
}

/// HKDF-Expand-Label (RFC 8446 §7.1).
fn expand_label<const N: usize>(secret: &[u8], label: &[u8], context: &[u8]) -> [u8; N] {
    let mut info = Vec::new();
    info.extend_from_slice(&u16::try_from(N).expect("short output").to_be_bytes());
    info.push(u8::try_from(6 + label.len()).expect("short label"));
    info.extend_from_slice(b"tls13 ");
    info.extend_from_slice(label);
    info.push(u8::try_from(context.len()).expect("short context"));
    info.extend_from_slice(context);
    let mut out = [0u8; N];
    Hkdf::<Sha256>::from_prk(secret).expect("PRK is a hash long").expand(&info, &mut out).expect("N fits");
    out
}

fn extract(salt: &[u8], ikm: &[u8]) -> [u8; 32] {
    let (prk, _) = Hkdf::<Sha256>::extract(Some(salt), ikm);
    prk.into()
}

fn derive_secret(secret: &[u8], label: &[u8], transcript: &Sha256) -> [u8; 32] {
    expand_label(secret, label, &transcript.clone().finalize())
}

fn handshake_message(ty: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("short body").to_be_bytes();
    let mut m = vec![ty, len[1], len[2], len[3]];
    m.extend_from_slice(body);
    m
}

fn read_record(tcp: &mut TcpStream) -> Result<([u8; 5], Vec<u8>), String> {
    let mut header = [0u8; 5];
    tcp.read_exact(&mut header).map_err(|e| format!("read: {e}"))?;
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).map_err(|e| format!("read: {e}"))?;
    Ok((header, body))
}

/// A cursor over a ClientHello.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("ClientHello truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8_vec(&mut self) -> Result<&'a [u8], String> {
        let n = usize::from(self.take(1)?[0]);
        self.take(n)
    }
    fn u16_vec(&mut self) -> Result<&'a [u8], String> {
        let l = self.take(2)?;
        let n = usize::from(u16::from_be_bytes([l[0], l[1]]));
        self.take(n)
    }
}

/// Session id and the secp256r1 key share of a ClientHello body.
fn parse_client_hello(body: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut r = Reader(body);
    r.take(2 + 32)?;
    let session_id = r.u8_vec()?.to_vec();
    let suites = r.u16_vec()?;
    if !suites.chunks(2).any(|s| s == [0x13, 0x01]) {
        return Err("client does not offer TLS_AES_128_GCM_SHA256".into());
    }
    r.u8_vec()?;
    let mut exts = Reader(r.u16_vec()?);
    while !exts.0.is_empty() {
        let ty = exts.take(2)?;
        let data = exts.u16_vec()?;
        if ty == [0x00, 0x33] {
            let mut shares = Reader(data);
            let mut list = Reader(shares.u16_vec()?);
            while !list.0.is_empty() {
                let group = list.take(2)?;
                let key = list.u16_vec()?;
                if group == [0x00, 0x17] {
                    return Ok((session_id, key.to_vec()));
                }
            }
        }
    }
    Err("no secp256r1 key share".into())
}

fn certificate_verify(key: &SigningKey, transcript: &Sha256) -> Vec<u8> {
    let mut msg = vec![0x20u8; 64];
    msg.extend_from_slice(b"TLS 1.3, server CertificateVerify\x00");
    msg.extend_from_slice(&transcript.clone().finalize());
    let sig: DerSignature = key.sign(&msg);
    let sig = sig.as_bytes();
    let mut body = vec![0x04, 0x03];
    body.extend_from_slice(&u16::try_from(sig.len()).expect("short signature").to_be_bytes());
    body.extend_from_slice(sig);
    handshake_message(15, &body)
}

fn serve(
    mut tcp: TcpStream,
    mode: Mode,
    cert: &[u8],
    key: &SigningKey,
    report: &mut Report,
) -> Result<(), String> {
    tcp.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    let mut transcript = Sha256::new();

    // ClientHello (plaintext, one record).
    let (header, record) = read_record(&mut tcp)?;
    if header[0] != HANDSHAKE || record.first() != Some(&1) || record.len() < 4 {
        return Err("first record is not a ClientHello".into());
    }
    transcript.update(&record);
    let (session_id, client_share) = parse_client_hello(&record[4..])?;
    let client_key = p256::PublicKey::from_sec1_bytes(&client_share).map_err(|_| "bad client key share")?;
    let ephemeral = p256::ecdh::EphemeralSecret::random(&mut rand::rngs::OsRng);
    let shared = ephemeral.diffie_hellman(&client_key);
    let our_share = p256::EncodedPoint::from(ephemeral.public_key());

    // ServerHello.
    let mut sh = vec![0x03, 0x03];
    sh.extend_from_slice(&rand::random::<[u8; 32]>());
    sh.push(u8::try_from(session_id.len()).map_err(|_| "long session id")?);
    sh.extend_from_slice(&session_id);
    sh.extend_from_slice(&[0x13, 0x01, 0x00]);
    let mut exts = vec![0x00, 0x2b, 0x00, 0x02, 0x03, 0x04, 0x00, 0x33, 0x00, 0x45, 0x00, 0x17, 0x00, 0x41];
    exts.extend_from_slice(our_share.as_bytes());
    sh.extend_from_slice(&u16::try_from(exts.len()).expect("short").to_be_bytes());
    sh.extend_from_slice(&exts);
    let sh = handshake_message(2, &sh);
    transcript.update(&sh);
    let mut out = vec![HANDSHAKE, 3, 3];
    out.extend_from_slice(&u16::try_from(sh.len()).expect("short").to_be_bytes());
    out.extend_from_slice(&sh);
    tcp.write_all(&out).map_err(|e| e.to_string())?;

    // Key schedule up to the handshake traffic secrets.
    let zeros = [0u8; 32];
    let early = extract(&[0], &zeros);
    let handshake_secret =
        extract(&derive_secret(&early, b"derived", &Sha256::new()), shared.raw_secret_bytes());
    let c_hs = derive_secret(&handshake_secret, b"c hs traffic", &transcript);
    let s_hs = derive_secret(&handshake_secret, b"s hs traffic", &transcript);
    let master = extract(&derive_secret(&handshake_secret, b"derived", &Sha256::new()), &zeros);
    let mut server_keys = Keys::from_secret(&s_hs);
    let mut client_keys = Keys::from_secret(&c_hs);

    // The server's encrypted flight, one handshake message per record.
    let mut send = |msg: Vec<u8>, transcript: &mut Sha256, tcp: &mut TcpStream| -> Result<(), String> {
        transcript.update(&msg);
        tcp.write_all(&server_keys.seal(HANDSHAKE, &msg)).map_err(|e| format!("{CLOSED}: {e}"))
    };
    send(handshake_message(8, &[0, 0]), &mut transcript, &mut tcp)?;
    send(handshake_message(13, &[0, 0, 8, 0x00, 0x0d, 0, 4, 0, 2, 0x04, 0x03]), &mut transcript, &mut tcp)?;
    let certificate = {
        let len = u32::try_from(cert.len()).expect("short cert").to_be_bytes();
        let mut entry = vec![len[1], len[2], len[3]];
        entry.extend_from_slice(cert);
        entry.extend_from_slice(&[0, 0]);
        let list = u32::try_from(entry.len()).expect("short").to_be_bytes();
        let mut body = vec![0, list[1], list[2], list[3]];
        body.extend_from_slice(&entry);
        handshake_message(11, &body)
    };
    match mode {
        Mode::NoCertificate => {}
        Mode::CertificateWithoutVerify => send(certificate, &mut transcript, &mut tcp)?,
        Mode::VerifyByOtherKey => {
            send(certificate, &mut transcript, &mut tcp)?;
            let other = SigningKey::random(&mut rand::rngs::OsRng);
            let cv = certificate_verify(&other, &transcript);
            send(cv, &mut transcript, &mut tcp)?;
        }
        Mode::VerifyBeforeCertificate => {
            let cv = certificate_verify(key, &transcript);
            send(cv, &mut transcript, &mut tcp)?;
            send(certificate, &mut transcript, &mut tcp)?;
        }
        Mode::Correct | Mode::SecondCertificate => {
            send(certificate.clone(), &mut transcript, &mut tcp)?;
            let cv = certificate_verify(key, &transcript);
            send(cv, &mut transcript, &mut tcp)?;
            if mode == Mode::SecondCertificate {
                send(certificate, &mut transcript, &mut tcp)?;
            }
        }
    }
    let finished_key: [u8; 32] = expand_label(&s_hs, b"finished", &[]);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&finished_key).expect("HMAC takes any key");
    mac.update(&transcript.clone().finalize());
    send(handshake_message(20, &mac.finalize().into_bytes()), &mut transcript, &mut tcp)?;
    let c_ap = derive_secret(&master, b"c ap traffic", &transcript);
    let s_ap = derive_secret(&master, b"s ap traffic", &transcript);
    let mut server_app = Keys::from_secret(&s_ap);

    // The client's flight, then whatever it sends as application data.
    loop {
        let Ok((header, body)) = read_record(&mut tcp) else {
            return Ok(()); // closed or silent: done
        };
        if header[0] == CHANGE_CIPHER_SPEC {
            continue;
        }
        if header[0] == ALERT && body.len() == 2 {
            report.alert = Some((body[0], body[1]));
            return Ok(());
        }
        let (ty, content) = client_keys.open(&header, &body)?;
        match ty {
            HANDSHAKE => {
                let mut msgs = content.as_slice();
                while msgs.len() >= 4 {
                    let len = usize::from(msgs[1]) << 16 | usize::from(msgs[2]) << 8 | usize::from(msgs[3]);
                    let Some(body) = msgs.get(4..4 + len) else { break };
                    match msgs[0] {
                        11 if body.len() >= 4 => {
                            let list = usize::from(body[2]) << 8 | usize::from(body[3]);
                            report.client_sent_certificate = Some(list > 0);
                        }
                        20 => report.client_finished = true,
                        _ => {}
                    }
                    msgs = &msgs[4 + len..];
                }
                if report.client_finished {
                    client_keys = Keys::from_secret(&c_ap);
                }
            }
            APPLICATION_DATA => {
                let first = report.app_bytes == 0;
                report.app_bytes += content.len();
                if first && mode == Mode::Correct && content.first().map(|b| b >> 4) == Some(1) {
                    let connack = server_app.seal(APPLICATION_DATA, &[0x20, 2, 0, 0]);
                    tcp.write_all(&connack).map_err(|e| e.to_string())?;
                }
            }
            ALERT => {
                report.alert = content.get(..2).map(|a| (a[0], a[1]));
                return Ok(());
            }
            other => return Err(format!("unexpected inner content type {other}")),
        }
    }
}
