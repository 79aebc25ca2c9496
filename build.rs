//! What a C library needs beyond compiling: `include/pkcs11_ha.h` is
//! checked against the Rust definitions it declares, so that the two
//! cannot drift apart unnoticed, and the names the library may export (the
//! PKCS#11 functions, `CA_GetHAState`, `PKCS11HA_*`) are handed to the
//! tests as `PKCS11_HA_EXPORTS`, which check the built library's dynamic
//! symbols against them.
//!
//! No linker version script: rustc already gives the linker one listing
//! every `#[no_mangle]` function as global, and a second script can only
//! add to that list, never narrow it.

use std::collections::BTreeMap;

const HEADER: &str = "include/pkcs11_ha.h";
const STATE_API: &str = "src/state_api.rs";
const STATE_EXPORTS: &str = "src/ffi/state.rs";
const FUNCTION_LIST: &str = "src/ffi/mod.rs";
/// Exported beside the function table: how PKCS#11 3.0 clients find it.
const INTERFACE_FUNCTIONS: [&str; 2] = ["C_GetInterfaceList", "C_GetInterface"];

fn main() {
    for file in [HEADER, STATE_API, STATE_EXPORTS, FUNCTION_LIST] {
        println!("cargo:rerun-if-changed={file}");
    }
    let header = Api::parse_header(&read(HEADER));
    let rust = Api::parse_rust(&read(STATE_API), &read(STATE_EXPORTS));
    let drift = header.differences(&rust);
    if !drift.is_empty() {
        panic!(
            "{HEADER} does not match {STATE_API} / {STATE_EXPORTS}; make them agree:\n  {}",
            drift.join("\n  ")
        );
    }
    let mut exports = function_list_names(&read(FUNCTION_LIST));
    exports.extend(INTERFACE_FUNCTIONS.map(String::from));
    exports.extend(header.functions.keys().cloned());
    println!("cargo:rustc-env=PKCS11_HA_EXPORTS={}", exports.join(","));
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The names in `function_list!( ... );`: the PKCS#11 table we export.
fn function_list_names(source: &str) -> Vec<String> {
    let start = source
        .find("function_list!(\n")
        .unwrap_or_else(|| panic!("{FUNCTION_LIST} has no `function_list!(` invocation"));
    let body = &source[start + "function_list!(".len()..];
    let end = body.find(");").expect("function_list!( is closed");
    let names: Vec<String> = body[..end]
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("C_")),
        "{FUNCTION_LIST}: function_list! names only C_ functions"
    );
    names
}

/// A struct as a list of (field, type), the type written the Rust way
/// (`CK_ULONG`, `[CK_CHAR; CK_HA_SERIAL_SIZE]`).
type Fields = Vec<(String, String)>;

/// What both sides declare: constants, structs, and the exported
/// functions' parameter types (Rust spelling).
#[derive(Default)]
struct Api {
    constants: BTreeMap<String, u64>,
    structs: BTreeMap<String, Fields>,
    functions: BTreeMap<String, Vec<String>>,
}

/// Drops `/* ... */` and `//` comments.
fn without_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("*/").expect("comment is closed");
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn number(text: &str) -> Option<u64> {
    text.trim()
        .trim_end_matches(['U', 'L', 'u', 'l'])
        .parse()
        .ok()
}

impl Api {
    fn parse_header(text: &str) -> Api {
        let text = without_comments(text);
        let mut api = Api::default();
        let mut pointer_types: BTreeMap<String, String> = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if let Some(define) = line.strip_prefix("#define ") {
                let mut words = define.split_whitespace();
                if let (Some(name), Some(value)) = (words.next(), words.next()) {
                    if let Some(value) = number(value) {
                        api.constants.insert(name.into(), value);
                    }
                }
            } else if let Some(typedef) = line.strip_prefix("typedef ") {
                // `typedef TARGET *NAME;`
                if let Some((target, name)) = typedef.trim_end_matches(';').split_once('*') {
                    if !target.starts_with("struct") {
                        pointer_types.insert(name.trim().into(), format!("*mut {}", target.trim()));
                    }
                }
            }
        }
        let mut rest = text.as_str();
        while let Some(start) = rest.find("typedef struct ") {
            let block = &rest[start + "typedef struct ".len()..];
            let name = block
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            let open = block.find('{').expect("struct has a body");
            let close = block.find('}').expect("struct body is closed");
            let fields = block[open + 1..close]
                .split(';')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(|field| {
                    let (ty, declarator) = field.rsplit_once(char::is_whitespace).unwrap();
                    match declarator.split_once('[') {
                        Some((name, size)) => (
                            name.to_string(),
                            format!("[{}; {}]", ty.trim(), size.trim_end_matches(']')),
                        ),
                        None => (declarator.to_string(), ty.trim().to_string()),
                    }
                })
                .collect();
            api.structs.insert(name, fields);
            rest = &block[close..];
        }
        for line in text.lines().map(str::trim) {
            let Some(declaration) = line.strip_prefix("CK_RV ") else {
                continue;
            };
            let Some((name, params)) = declaration.split_once('(') else {
                continue;
            };
            let params = params.trim_end_matches(';').trim_end_matches(')');
            let types = params
                .split(',')
                .map(|p| {
                    let p = p.trim();
                    if let Some((target, _)) = p.split_once('*') {
                        format!("*mut {}", target.trim())
                    } else {
                        let ty = p.rsplit_once(' ').map_or(p, |(t, _)| t).trim();
                        pointer_types
                            .get(ty)
                            .cloned()
                            .unwrap_or_else(|| ty.to_string())
                    }
                })
                .collect();
            api.functions.insert(name.trim().into(), types);
        }
        api
    }

    fn parse_rust(definitions: &str, exports: &str) -> Api {
        let definitions = without_comments(definitions);
        let mut api = Api::default();
        let mut lines = definitions.lines().map(str::trim);
        while let Some(line) = lines.next() {
            if let Some(constant) = line.strip_prefix("pub const ") {
                let (name, rest) = constant.split_once(':').expect("const has a type");
                let value = rest.split_once('=').expect("const has a value").1;
                if let Some(value) = number(value.trim_end_matches(';')) {
                    api.constants.insert(name.trim().into(), value);
                }
            } else if let Some(declaration) = line.strip_prefix("pub struct ") {
                let name = declaration.trim_end_matches('{').trim().to_string();
                let mut fields = Vec::new();
                for field in lines.by_ref().take_while(|l| *l != "}") {
                    let field = field.trim_start_matches("pub ").trim_end_matches(',');
                    let (name, ty) = field.split_once(':').expect("field has a type");
                    fields.push((name.trim().into(), ty.trim().into()));
                }
                api.structs.insert(name, fields);
            }
        }
        let exports = without_comments(exports);
        for line in exports.lines().map(str::trim) {
            let Some(signature) = line.strip_prefix("fn ") else {
                continue;
            };
            let Some((name, params)) = signature.split_once('(') else {
                continue;
            };
            let params = params.split_once(')').map_or(params, |(p, _)| p);
            let types = params
                .split(',')
                .filter_map(|p| p.split_once(':'))
                .map(|(_, ty)| ty.trim().to_string())
                .collect();
            api.functions.insert(name.trim().into(), types);
        }
        api
    }

    /// Each way in which the header (`self`) and the Rust side differ.
    fn differences(&self, rust: &Api) -> Vec<String> {
        let mut drift = Vec::new();
        compare(&mut drift, "constant", &self.constants, &rust.constants);
        compare(&mut drift, "struct", &self.structs, &rust.structs);
        compare(&mut drift, "function", &self.functions, &rust.functions);
        drift
    }
}

fn compare<V: PartialEq + std::fmt::Debug>(
    drift: &mut Vec<String>,
    what: &str,
    header: &BTreeMap<String, V>,
    rust: &BTreeMap<String, V>,
) {
    for (name, c) in header {
        match rust.get(name) {
            None => drift.push(format!("{what} {name} is in the header only")),
            Some(r) if r != c => drift.push(format!("{what} {name}: header {c:?}, Rust {r:?}")),
            Some(_) => {}
        }
    }
    for name in rust.keys().filter(|n| !header.contains_key(*n)) {
        drift.push(format!("{what} {name} is in the Rust code only"));
    }
}
