#!/usr/bin/env python3
"""Independent check of tests/vectors/records.json against docs/PROTOCOL.md.

Written from docs/PROTOCOL.md alone (sections cited as §n); it neither imports nor runs the
Rust code. Needs Python 3.8+ and the `cryptography` package (AES-ECB, AES-CBC, AES-GCM,
ChaCha20-Poly1305); HMAC-SHA256 comes from the standard library.

    python3 tests/vectors/check_vectors.py [path/to/records.json]

Prints one line per failure and a final line `N passed, M failed`; exits 1 on any failure.
"""

import hashlib
import hmac
import ipaddress
import json
import os
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

# §3.1 / §3.2
EXPORTER_LABEL = "EXPORTER-sudp-udp-keys-v1"
MAC_KEY_LEN = 32
SUITE_KEY_LEN = {0x01: 16, 0x02: 32, 0x03: 16, 0x04: 32}  # suite id -> Ke
AEAD_SUITES = {0x03: AESGCM, 0x04: ChaCha20Poly1305}  # §4.7
AEAD_IV_LEN = 12
MIN_AEAD_RECORD = 37  # §4.7: prefix + tag, empty plaintext

# §4.6
CONTENT_TYPE = 0x97
SECURE_FLAG = 0x80
VERSION = b"\x03\x03"
HEADER_LEN = 5
PREFIX_LEN = 21
TAG_LEN = 16
BLOCK = 16
MIN_RECORD = 53
MAX_DATAGRAM = 65507
MAX_CIPHERTEXT = 65456
MAX_PLAINTEXT = 65455
MAX_RECORDS_PER_KEY = 1 << 48

# §6.2
DEFAULT_WINDOW = 1024

# §4.1 control plaintexts
CONTROL_ATYP = 0x00
PATH_CHALLENGE = 0x01
PATH_RESPONSE = 0x02
PROBE = 0x03
PROBE_ACK = 0x04
TOKEN_LEN = 8


class Drop(Exception):
    """A receiver refused a datagram; `reason` is the §7 name."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class SealRefused(Exception):
    """A sender refused to seal (§4.4 steps 1-2)."""


# ---------------------------------------------------------------------------------------------
# Key schedule (§3.1)


def exporter_context(assoc_id, suite_id):
    return assoc_id.to_bytes(8, "big") + bytes([suite_id])


def key_lengths(suite_id):
    """(Ke, Km, Ki) of §3.1 / §3.2: the AEAD suites have no MAC key and a 12-byte IV."""
    ke = SUITE_KEY_LEN[suite_id]
    if suite_id in AEAD_SUITES:
        return ke, 0, AEAD_IV_LEN
    return ke, MAC_KEY_LEN, ke


def cut_keys(suite_id, material):
    """Returns {"c2g": (enc, mac, iv), "g2c": (enc, mac, iv)} (mac = b"" for an AEAD)."""
    ke, km, ki = key_lengths(suite_id)
    d = ke + km + ki
    if len(material) != 2 * d:
        raise ValueError("exporter output of %d bytes, want %d" % (len(material), 2 * d))

    def one(b):
        return b[:ke], b[ke:ke + km], b[ke + km:]

    return {"c2g": one(material[:d]), "g2c": one(material[d:])}


# ---------------------------------------------------------------------------------------------
# SOCKS5 addresses (§2.3)


def encode_address(a):
    atyp, host, port = a["atyp"], a["host"], a["port"]
    if atyp == 1:
        body = ipaddress.IPv4Address(host).packed
    elif atyp == 4:
        body = ipaddress.IPv6Address(host).packed
    elif atyp == 3:
        name = host.encode("ascii")
        if not 1 <= len(name) <= 255 or not all(0x21 <= c <= 0x7E for c in name):
            raise ValueError("bad domain")
        body = bytes([len(name)]) + name
    else:
        raise ValueError("bad atyp %d" % atyp)
    return bytes([atyp]) + body + port.to_bytes(2, "big")


def parse_address(buf):
    """Returns (address dict, bytes used); raises Drop("bad_address")."""
    if not buf:
        raise Drop("bad_address")
    atyp = buf[0]
    if atyp == 1:
        n = 4
        if len(buf) < 1 + n + 2:
            raise Drop("bad_address")
        host = str(ipaddress.IPv4Address(bytes(buf[1:5])))
        start = 1
    elif atyp == 4:
        n = 16
        if len(buf) < 1 + n + 2:
            raise Drop("bad_address")
        host = str(ipaddress.IPv6Address(bytes(buf[1:17])))
        start = 1
    elif atyp == 3:
        if len(buf) < 2:
            raise Drop("bad_address")
        n = buf[1]
        if len(buf) < 2 + n + 2:
            raise Drop("bad_address")
        name = bytes(buf[2:2 + n])
        if n == 0 or not all(0x21 <= c <= 0x7E for c in name):
            raise Drop("bad_address")
        host = name.decode("ascii")
        start = 2
    else:
        raise Drop("bad_address")
    end = start + n
    port = int.from_bytes(buf[end:end + 2], "big")
    return {"atyp": atyp, "host": host, "port": port}, end + 2


# ---------------------------------------------------------------------------------------------
# Record layer (§4)


def aes_ecb(key, block):
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return e.update(block) + e.finalize()


def derive_iv(iv_key, assoc_id, nonce):
    """§4.3: IV = AES(iv_key, assoc_id || nonce)."""
    return aes_ecb(iv_key, assoc_id.to_bytes(8, "big") + nonce.to_bytes(8, "big"))


def tag(mac_key, authenticated):
    return hmac.new(mac_key, authenticated, hashlib.sha256).digest()[:TAG_LEN]


def record_len(p, suite_id=0x01):
    if suite_id in AEAD_SUITES:
        return PREFIX_LEN + p + TAG_LEN  # §4.7: no padding
    return PREFIX_LEN + BLOCK * (p // BLOCK + 1) + TAG_LEN


def aead_nonce(iv, nonce):
    """§4.7: IV XOR the 8-byte nonce left-padded with zeros to 12 bytes."""
    padded = bytes(4) + nonce.to_bytes(8, "big")
    return bytes(a ^ b for a, b in zip(iv, padded))


def seal_aead(suite_id, keys, assoc_id, nonce, plaintext):
    """§4.7 sealing."""
    key, _, iv = keys
    if len(plaintext) > MAX_PLAINTEXT:
        raise SealRefused("too large")
    if nonce >= MAX_RECORDS_PER_KEY:
        raise SealRefused("key exhausted")
    header = (bytes([CONTENT_TYPE]) + VERSION + (len(plaintext) + 32).to_bytes(2, "big")
              + assoc_id.to_bytes(8, "big") + nonce.to_bytes(8, "big"))
    return header + AEAD_SUITES[suite_id](key).encrypt(aead_nonce(iv, nonce), plaintext, header)


def seal(keys, assoc_id, nonce, plaintext, suite_id=0x01):
    """§4.4 (CBC suites), §4.7 (AEAD suites)."""
    if suite_id in AEAD_SUITES:
        return seal_aead(suite_id, keys, assoc_id, nonce, plaintext)
    enc_key, mac_key, iv_key = keys
    if len(plaintext) > MAX_PLAINTEXT:
        raise SealRefused("too large")
    if nonce >= MAX_RECORDS_PER_KEY:
        raise SealRefused("key exhausted")
    pad = BLOCK - len(plaintext) % BLOCK
    padded = plaintext + bytes([pad]) * pad
    header = (bytes([CONTENT_TYPE]) + VERSION + (len(padded) + 32).to_bytes(2, "big")
              + assoc_id.to_bytes(8, "big") + nonce.to_bytes(8, "big"))
    iv = derive_iv(iv_key, assoc_id, nonce)
    e = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).encryptor()
    ct = e.update(padded) + e.finalize()
    return header + ct + tag(mac_key, header + ct)


class ReplayWindow:
    """§6.2, as a W-bit ring."""

    def __init__(self, size=DEFAULT_WINDOW):
        size = min(max(size, 64), 65536)
        self.w = (size + 63) // 64 * 64
        self.bits = [False] * self.w
        self.top = 0

    def check(self, n):
        if n >= self.top:
            return
        if n < self.top - self.w:
            raise Drop("too_old")
        if self.bits[n % self.w]:
            raise Drop("duplicate")

    def commit(self, n):
        if n >= self.top:
            if n + 1 - self.top >= self.w:
                self.bits = [False] * self.w
            else:
                for m in range(self.top, n + 1):
                    self.bits[m % self.w] = False
            self.top = n + 1
        self.bits[n % self.w] = True


class Receiver:
    """One receiving direction of one association (§6.1)."""

    def __init__(self, keys, assoc_id, window=DEFAULT_WINDOW, suite_id=0x01):
        self.enc_key, self.mac_key, self.iv_key = keys
        self.assoc_id = assoc_id
        self.window = ReplayWindow(window)
        self.suite_id = suite_id

    def open(self, rec):
        """Returns (nonce, address, payload), or (nonce, ("control", kind, token), b"") for a
        control plaintext (§4.1); raises Drop(reason)."""
        if self.suite_id in AEAD_SUITES:
            return self.open_aead(rec)
        n_bytes = len(rec)
        # 1-4: cleartext header
        if n_bytes < MIN_RECORD:
            raise Drop("truncated")
        if rec[0] != CONTENT_TYPE or rec[1:3] != VERSION:
            raise Drop("bad_header")
        if int.from_bytes(rec[3:5], "big") != n_bytes - HEADER_LEN:
            raise Drop("length_mismatch")
        ct_len = n_bytes - PREFIX_LEN - TAG_LEN
        if ct_len == 0 or ct_len % BLOCK:
            raise Drop("bad_ciphertext_length")
        assoc = int.from_bytes(rec[5:13], "big")
        nonce = int.from_bytes(rec[13:21], "big")
        # 5: association
        if assoc != self.assoc_id:
            raise Drop("unknown_association")
        # 6: nonce limit
        if nonce >= MAX_RECORDS_PER_KEY:
            raise Drop("nonce_limit")
        # 7: replay check, no state change
        self.window.check(nonce)
        # 8: tag, constant time
        if not hmac.compare_digest(tag(self.mac_key, rec[:-TAG_LEN]), rec[-TAG_LEN:]):
            raise Drop("bad_mac")
        # 9: commit
        self.window.commit(nonce)
        # 10: decrypt and unpad
        iv = derive_iv(self.iv_key, assoc, nonce)
        d = Cipher(algorithms.AES(self.enc_key), modes.CBC(iv)).decryptor()
        padded = d.update(rec[PREFIX_LEN:PREFIX_LEN + ct_len]) + d.finalize()
        pad = padded[-1]
        if not 1 <= pad <= BLOCK or padded[-pad:] != bytes([pad]) * pad:
            raise Drop("bad_padding")
        plaintext = padded[:-pad]
        return self.content(nonce, plaintext)

    def open_aead(self, rec):
        """§4.7: §6.1 with steps 1 and 4 of the AEAD suites, steps 8-10 as one AEAD open."""
        n_bytes = len(rec)
        if n_bytes < MIN_AEAD_RECORD:
            raise Drop("truncated")
        if rec[0] != CONTENT_TYPE or rec[1:3] != VERSION:
            raise Drop("bad_header")
        if int.from_bytes(rec[3:5], "big") != n_bytes - HEADER_LEN:
            raise Drop("length_mismatch")
        assoc = int.from_bytes(rec[5:13], "big")
        nonce = int.from_bytes(rec[13:21], "big")
        if assoc != self.assoc_id:
            raise Drop("unknown_association")
        if nonce >= MAX_RECORDS_PER_KEY:
            raise Drop("nonce_limit")
        self.window.check(nonce)
        aead = AEAD_SUITES[self.suite_id](self.enc_key)
        try:
            plaintext = aead.decrypt(aead_nonce(self.iv_key, nonce), bytes(rec[PREFIX_LEN:]),
                                     bytes(rec[:PREFIX_LEN]))
        except InvalidTag:
            raise Drop("bad_mac")
        self.window.commit(nonce)
        return self.content(nonce, plaintext)

    def content(self, nonce, plaintext):
        # 11: control plaintext (§4.1) or address
        if plaintext[:1] == bytes([CONTROL_ATYP]):
            if (len(plaintext) != 2 + TOKEN_LEN
                    or plaintext[1] not in (PATH_CHALLENGE, PATH_RESPONSE, PROBE, PROBE_ACK)):
                raise Drop("bad_control")
            return nonce, ("control", plaintext[1], plaintext[2:]), b""
        addr, used = parse_address(plaintext)
        return nonce, addr, plaintext[used:]


def classify(datagram):
    """§5."""
    if datagram and datagram[0] & SECURE_FLAG:
        return "secure"
    if datagram[:2] == b"\x00\x00":
        return "naked"
    return "unknown"


# ---------------------------------------------------------------------------------------------
# Checks


class Tally:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, what):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print("FAIL: " + what)

    def expect_drop(self, fn, reason, what):
        try:
            fn()
        except Drop as e:
            self.check(e.reason == reason, "%s: dropped as %s, want %s" % (what, e.reason, reason))
        else:
            self.check(False, "%s: accepted, want %s" % (what, reason))


def normalise(a):
    """Canonical host text so "2001:db8::7" compares equal however it is written."""
    a = dict(a)
    if a["atyp"] in (1, 4):
        a["host"] = str(ipaddress.ip_address(a["host"]))
    return a


def check_valid(t, v):
    name = v["name"]
    suite = v["suite_id"]
    assoc = int(v["assoc_id"], 16)
    t.check(suite in SUITE_KEY_LEN, name + ": known suite")
    t.check(v["exporter_label"] == EXPORTER_LABEL, name + ": exporter label")
    t.check(exporter_context(assoc, suite).hex() == v["exporter_context"], name + ": exporter context")

    material = bytes.fromhex(v["exporter_output"])
    t.check(len(material) == 2 * sum(key_lengths(suite)), name + ": exporter length")
    schedule = cut_keys(suite, material)
    direction = v["direction"]
    t.check(direction in ("c2g", "g2c"), name + ": direction")
    keys = schedule[direction]
    for i, field in enumerate(("enc_key", "mac_key", "iv_key")):
        t.check(keys[i].hex() == v[field], "%s: %s from exporter output" % (name, field))

    payload = bytes.fromhex(v["payload"])
    plaintext = encode_address(v["address"]) + payload
    t.check(plaintext.hex() == v["plaintext"], name + ": plaintext = address + payload")

    want = bytes.fromhex(v["record"])
    got = seal(keys, assoc, v["nonce"], plaintext, suite)
    t.check(got == want, name + ": sealed record bytes")
    t.check(len(want) == record_len(len(plaintext), suite), name + ": record length formula")
    if suite in AEAD_SUITES:
        t.check(v.get("aead_nonce") == aead_nonce(keys[2], v["nonce"]).hex(), name + ": AEAD nonce")
        t.check(v.get("aad") == want[:PREFIX_LEN].hex(), name + ": AAD = the 21 cleartext bytes")
    t.check(len(want) <= MAX_DATAGRAM, name + ": fits in one datagram")
    t.check(classify(want) == "secure", name + ": detector says secure")

    # The receiver of a c2g record is the gateway, which opens with the c2g keys (§3.1 table).
    rx = Receiver(keys, assoc, suite_id=suite)
    try:
        nonce, addr, body = rx.open(want)
        t.check(nonce == v["nonce"], name + ": opened nonce")
        t.check(normalise(addr) == normalise(v["address"]), name + ": opened address")
        t.check(body == payload, name + ": opened payload")
    except Drop as e:
        t.check(False, "%s: open failed: %s" % (name, e.reason))
    t.expect_drop(lambda: rx.open(want), "duplicate", name + ": replayed record")

    # The opposite direction's keys must not open it.
    other = schedule["g2c" if direction == "c2g" else "c2g"]
    t.expect_drop(lambda: Receiver(other, assoc, suite_id=suite).open(want), "bad_mac",
                  name + ": other direction's keys")


def check_invalid(t, v, valid_by_name):
    name = v["name"]
    of = valid_by_name.get(v["of"])
    t.check(of is not None, name + ": base vector exists")
    if of is None:
        return
    keys = cut_keys(of["suite_id"], bytes.fromhex(of["exporter_output"]))[of["direction"]]
    rx = Receiver(keys, int(of["assoc_id"], 16), suite_id=of["suite_id"])
    # §9: records the receiver accepts first.
    for first in v.get("after", []):
        try:
            rx.open(bytes.fromhex(first))
        except Drop as e:
            t.check(False, name + ": `after` record refused: " + e.reason)
    t.expect_drop(lambda: rx.open(bytes.fromhex(v["record"])), v["expect"], "invalid " + name)


def check_document_rules(t, first):
    """Properties stated in the document, exercised on keys of the first valid vector."""
    suite = first["suite_id"]
    assoc = int(first["assoc_id"], 16)
    keys = cut_keys(suite, bytes.fromhex(first["exporter_output"]))[first["direction"]]
    enc_key, mac_key, iv_key = keys
    addr = encode_address({"atyp": 1, "host": "192.0.2.10", "port": 5004})

    # §4.6 constants
    t.check(MIN_RECORD == PREFIX_LEN + BLOCK + TAG_LEN, "MIN_RECORD")
    t.check(MAX_CIPHERTEXT == (MAX_DATAGRAM - PREFIX_LEN - TAG_LEN) // BLOCK * BLOCK, "MAX_CIPHERTEXT")
    t.check(record_len(MAX_PLAINTEXT) == 65493 <= MAX_DATAGRAM < record_len(MAX_PLAINTEXT + 1),
            "largest plaintext fits, one more does not")
    t.check(record_len(7 + 160) == 213, "VoIP 160 bytes to IPv4 costs a 213-byte record")

    # §4.4 sender refusals
    try:
        seal(keys, assoc, 0, bytes(MAX_PLAINTEXT + 1))
        t.check(False, "oversized plaintext refused")
    except SealRefused:
        t.check(True, "oversized plaintext refused")
    try:
        seal(keys, assoc, MAX_RECORDS_PER_KEY, addr)
        t.check(False, "nonce 2^48 refused by the sender")
    except SealRefused:
        t.check(True, "nonce 2^48 refused by the sender")
    seal(keys, assoc, MAX_RECORDS_PER_KEY - 1, addr)
    t.check(True, "nonce 2^48 - 1 sealable")

    # §5 detector
    t.check(classify(b"") == "unknown", "detector: empty")
    t.check(classify(b"\x00") == "unknown", "detector: one zero byte")
    t.check(classify(b"\x00\x00\x00\x01") == "naked", "detector: naked")
    t.check(classify(b"\x17\x03\x03") == "unknown", "detector: TLS record without flag")
    t.check(classify(b"\x85") == "secure", "detector: any byte with 0x80")
    rx = Receiver(keys, assoc)
    t.expect_drop(lambda: rx.open(b"\x85" + bytes(60)), "bad_header", "flagged but not 0x97")
    t.expect_drop(lambda: rx.open(b"\x97"), "truncated", "a single 0x97 byte is a secure datagram, cut short")

    # §6.1 steps 10-11: authenticated but malformed plaintext; nonce stays committed.
    def forge(nonce, padded):
        header = (bytes([CONTENT_TYPE]) + VERSION + (len(padded) + 32).to_bytes(2, "big")
                  + assoc.to_bytes(8, "big") + nonce.to_bytes(8, "big"))
        e = Cipher(algorithms.AES(enc_key), modes.CBC(derive_iv(iv_key, assoc, nonce))).encryptor()
        ct = e.update(padded) + e.finalize()
        return header + ct + tag(mac_key, header + ct)

    rx = Receiver(keys, assoc)
    bad_pad = forge(3, bytes(16))
    t.expect_drop(lambda: rx.open(bad_pad), "bad_padding", "pad byte 0")
    t.expect_drop(lambda: rx.open(bad_pad), "duplicate", "bad_padding record committed its nonce")
    t.expect_drop(lambda: rx.open(forge(4, bytes(15) + b"\x11")), "bad_padding", "pad byte 17")
    t.expect_drop(lambda: rx.open(forge(5, b"\x09" + bytes(13) + b"\x02\x02")), "bad_address", "ATYP 9")
    t.expect_drop(lambda: rx.open(forge(6, b"\x03\x00\x00\x01" + bytes([12]) * 12)), "bad_address",
                  "empty domain")
    t.expect_drop(lambda: rx.open(forge(7, b"\x01\x7f\x00" + bytes([13]) * 13)), "bad_address",
                  "cut IPv4 address")
    t.expect_drop(lambda: rx.open(seal(keys, assoc, 8, b"")), "bad_address", "empty plaintext")
    # §4.1 control plaintexts: known kinds open as control, never as data.
    got = rx.open(seal(keys, assoc, 9, b"\x00\x01" + bytes(range(8))))
    t.check(got[1] == ("control", PATH_CHALLENGE, bytes(range(8))) and got[2] == b"",
            "PATH_CHALLENGE opens as control")
    got = rx.open(seal(keys, assoc, 10, b"\x00\x02" + bytes(8)))
    t.check(got[1] == ("control", PATH_RESPONSE, bytes(8)), "PATH_RESPONSE opens as control")
    got = rx.open(seal(keys, assoc, 15, b"\x00\x03" + bytes(range(8))))
    t.check(got[1] == ("control", PROBE, bytes(range(8))), "PROBE opens as control")
    got = rx.open(seal(keys, assoc, 16, b"\x00\x04" + bytes(8)))
    t.check(got[1] == ("control", PROBE_ACK, bytes(8)), "PROBE_ACK opens as control")
    t.expect_drop(lambda: rx.open(seal(keys, assoc, 11, b"\x00\x05" + bytes(8))), "bad_control",
                  "unknown control kind")
    t.expect_drop(lambda: rx.open(seal(keys, assoc, 12, b"\x00\x01" + bytes(9))), "bad_control",
                  "control body too long")
    t.expect_drop(lambda: rx.open(seal(keys, assoc, 13, b"\x00")), "bad_control", "control without KIND")
    t.check(len(seal(keys, assoc, 14, b"\x00\x01" + bytes(8))) == MIN_RECORD,
            "a path message is one block")

    # §6.2 window behaviour
    rx = Receiver(keys, assoc, window=64)
    rx.open(seal(keys, assoc, 100, addr))
    t.expect_drop(lambda: rx.open(seal(keys, assoc, 36, addr)), "too_old", "W=64: 36 after 100")
    t.expect_drop(lambda: rx.open(seal(keys, assoc, 100, addr)), "duplicate", "W=64: 100 again")
    try:
        rx.open(seal(keys, assoc, 37, addr))
        rx.open(seal(keys, assoc, 99, addr))
        rx.open(seal(keys, assoc, 101, addr))
        t.check(True, "W=64: 37, 99, 101 accepted after 100")
    except Drop as e:
        t.check(False, "W=64: in-window nonce refused: " + e.reason)
    t.expect_drop(lambda: rx.open(seal(keys, assoc, 37, addr)), "too_old", "W=64: 37 after 101")

    # A forged far-ahead record does not move the window.
    rx = Receiver(keys, assoc)
    good = seal(keys, assoc, 0, addr)
    forged = bytearray(good)
    forged[13:21] = (10 ** 6).to_bytes(8, "big")
    t.expect_drop(lambda: rx.open(bytes(forged)), "bad_mac", "forged far-ahead nonce")
    t.check(rx.window.top == 0, "forged record left the window alone")
    # An authenticated far-ahead record is accepted and the window jumps.
    rx.open(seal(keys, assoc, 10 ** 6, addr))
    t.check(rx.window.top == 10 ** 6 + 1, "far-ahead record moved top")
    t.expect_drop(lambda: rx.open(good), "too_old", "nonce 0 after the jump")
    try:
        rx.open(seal(keys, assoc, 10 ** 6 - 1023, addr))
        t.check(True, "W=1024: oldest in-window nonce accepted after the jump")
    except Drop as e:
        t.check(False, "W=1024: oldest in-window nonce refused: " + e.reason)

    # Window sizes round and clamp.
    t.check([ReplayWindow(s).w for s in (0, 65, 1024, 10 ** 9)] == [64, 128, 1024, 65536], "window sizes")

    # §4.3 IVs are not counters.
    a, b = derive_iv(iv_key, assoc, 1), derive_iv(iv_key, assoc, 2)
    t.check(sum(x != y for x, y in zip(a, b)) > 4, "IVs of consecutive nonces are unrelated")


def check_aead_rules(t, first):
    """§4.7 properties, on the keys of the first vector of an AEAD suite."""
    suite = first["suite_id"]
    name = first["name"]
    assoc = int(first["assoc_id"], 16)
    keys = cut_keys(suite, bytes.fromhex(first["exporter_output"]))[first["direction"]]
    addr = encode_address({"atyp": 1, "host": "192.0.2.10", "port": 5004})

    def s(n, p):
        return seal(keys, assoc, n, p, suite)

    t.check(record_len(MAX_PLAINTEXT, suite) == 65492 <= MAX_DATAGRAM, name + ": largest AEAD record")
    t.check(len(s(0, addr + bytes(160))) == 7 + 160 + 37, name + ": overhead is 37 bytes")
    t.check(len(s(1, b"\x00\x01" + bytes(8))) == 47, name + ": a path message is 47 bytes")
    try:
        s(MAX_RECORDS_PER_KEY, addr)
        t.check(False, name + ": nonce 2^48 refused by the sender")
    except SealRefused:
        t.check(True, name + ": nonce 2^48 refused by the sender")
    rx = Receiver(keys, assoc, suite_id=suite)
    # Lengths no CBC record has open; a record of 36 bytes is truncated.
    for n in range(0, 20):
        got = rx.open(s(100 + n, addr + bytes(n)))
        t.check(got[2] == bytes(n), "%s: %d-byte payload" % (name, n))
    t.expect_drop(lambda: rx.open(s(200, b"")[:36]), "truncated", name + ": 36 bytes")
    t.expect_drop(lambda: rx.open(s(201, b"")), "bad_address", name + ": empty plaintext")
    got = rx.open(s(202, b"\x00\x01" + bytes(range(8))))
    t.check(got[1] == ("control", PATH_CHALLENGE, bytes(range(8))), name + ": PATH_CHALLENGE")
    # A forged far-ahead record does not move the window; a replay with a bad tag is a duplicate.
    rx = Receiver(keys, assoc, suite_id=suite)
    good = s(0, addr)
    forged = bytearray(good)
    forged[13:21] = (10 ** 6).to_bytes(8, "big")
    t.expect_drop(lambda: rx.open(bytes(forged)), "bad_mac", name + ": forged far-ahead nonce")
    t.check(rx.window.top == 0, name + ": forged record left the window alone")
    rx.open(good)
    bad = bytearray(good)
    bad[-1] ^= 1
    t.expect_drop(lambda: rx.open(bytes(bad)), "duplicate", name + ": replay checked before the tag")
    # Every header byte is authenticated (AAD): a changed version or length is refused.
    other = bytearray(s(1, addr))
    other[12] ^= 1  # association id: unknown
    t.expect_drop(lambda: rx.open(bytes(other)), "unknown_association", name + ": other association")
    # The nonce enters the AEAD only through IV XOR nonce: nonces 1 and 2 use different AEAD nonces.
    t.check(aead_nonce(keys[2], 1) != aead_nonce(keys[2], 2), name + ": AEAD nonces differ")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "records.json")
    with open(path) as f:
        data = json.load(f)
    t = Tally()
    valid = data["valid"]
    invalid = data["invalid"]
    t.check(len(valid) > 0 and len(invalid) > 0, "vector file has valid and invalid cases")
    for v in valid:
        check_valid(t, v)
    by_name = {v["name"]: v for v in valid}
    for v in invalid:
        check_invalid(t, v, by_name)
    if valid:
        check_document_rules(t, valid[0])
    for suite in sorted(AEAD_SUITES):
        first = [v for v in valid if v["suite_id"] == suite]
        t.check(bool(first), "vectors of AEAD suite %d" % suite)
        if first:
            check_aead_rules(t, first[0])
    print("%d passed, %d failed" % (t.passed, t.failed))
    return 1 if t.failed else 0


if __name__ == "__main__":
    sys.exit(main())
