use lorad_schema::{Response, WireError};

pub fn handle() -> Result<Response, WireError> {
    Ok(Response::Templates {
        templates: crate::templates::builtin(),
    })
}
