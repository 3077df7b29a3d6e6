//! Topic names and subscription filters from arbitrary bytes: parsing and matching never panic,
//! a parsed filter keeps its source text, an exact filter matches its own topic, and `#` matches
//! every valid topic name except those starting with `$` (MQTT 4.7.2), which it never matches.
#![no_main]

use ferry::{TopicFilter, TopicName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (filter, topic) = text.split_once('\u{1}').unwrap_or((&text, "a/b"));
    let name = TopicName::new(topic);
    for parsed in [
        TopicFilter::parse(filter),
        TopicFilter::mqtt(filter),
        TopicFilter::glob(filter),
        TopicFilter::exact(filter),
        TopicFilter::regex(filter),
    ] {
        if let Ok(f) = parsed {
            let _ = f.matches(topic);
            assert_eq!(f.as_str(), filter);
        }
    }
    if let Ok(exact) = TopicFilter::exact(filter) {
        assert!(exact.matches(filter));
    }
    if let Ok(name) = name {
        let all = TopicFilter::parse("#")
            .map(|f| f.matches(name.as_str()))
            .unwrap_or(false);
        assert_eq!(all, !name.is_dollar(), "{name:?}");
    }
});
