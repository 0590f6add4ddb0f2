//! GPT-2's map of the 256 byte values to printable characters, the
//! alphabet byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM) are
//! spelled in: printable Latin-1 bytes stand for themselves, the others
//! take the code points from U+0100 on, in byte order.

/// The character that spells byte `b`, for every `b`.
pub fn byte_alphabet() -> [char; 256] {
    let printable = |b: u32| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        map[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("valid code point")
        };
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_spelled_as_gpt2_spells_them() {
        let a = byte_alphabet();
        assert_eq!(
            (a[b'a' as usize], a[b' ' as usize], a[b'\n' as usize]),
            ('a', 'Ġ', 'Ċ')
        );
        assert_eq!(a[0], 'Ā');
        let distinct: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
