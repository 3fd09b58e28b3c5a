//! The API key `baton`'s own clients (`generate`, `status`, `budget`) present to a coordinator
//! that requires one: `$BATON_API_KEY`, sent as `authorization: Bearer <key>` metadata.

/// `message` as a gRPC request, with the key when `BATON_API_KEY` is set.
pub fn request<T>(message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Ok(key) = std::env::var("BATON_API_KEY")
        && !key.is_empty()
    {
        let value = format!("Bearer {key}")
            .parse()
            .map_err(|_| anyhow::anyhow!("BATON_API_KEY must be printable ASCII"))?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}
