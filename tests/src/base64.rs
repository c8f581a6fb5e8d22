//! Base64 for the guest init's `tapir.run=` kernel command line key.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// x86 Linux truncates the kernel command line at this many bytes (COMMAND_LINE_SIZE,
/// counting the terminating NUL), so a `tapir.run=` argument must leave room for the rest.
pub const KERNEL_CMDLINE_MAX: usize = 2047;

/// Standard base64 (RFC 4648, with `=` padding), which busybox `base64 -d` decodes.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut encoded = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b0 = chunk[0];
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let sextets = [
            b0 >> 2,
            (b0 & 0x03) << 4 | b1 >> 4,
            (b1 & 0x0f) << 2 | b2 >> 6,
            b2 & 0x3f,
        ];
        let kept = chunk.len() + 1;
        for (index, sextet) in sextets.iter().enumerate() {
            if index < kept {
                encoded.push(char::from(ALPHABET[usize::from(*sextet)]));
            } else {
                encoded.push('=');
            }
        }
    }
    encoded
}

/// The guest init's `tapir.run=<base64>` argument: the guest runs `command` with `sh -c`.
/// Mind [`KERNEL_CMDLINE_MAX`]: about 1.5 KB of command fits.
pub fn guest_run_arg(command: &str) -> String {
    format!("tapir.run={}", base64_encode(command.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_rfc4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain.as_bytes()), encoded, "input {plain:?}");
        }
    }

    #[test]
    fn encodes_every_byte_value_with_the_high_alphabet() {
        assert_eq!(base64_encode(&[0xfb, 0xff, 0xbf]), "+/+/");
        assert_eq!(base64_encode(&[0x00, 0x10, 0x83]), "ABCD");
    }

    #[test]
    fn run_arg_has_no_spaces_and_round_trips_through_the_key() {
        let arg = guest_run_arg("echo GUEST-OK; exit 5");
        assert_eq!(arg, "tapir.run=ZWNobyBHVUVTVC1PSzsgZXhpdCA1");
        assert!(!arg.contains(' '));
    }
}
