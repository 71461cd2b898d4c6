//! A minimal HTTP server for tests that need an API to misbehave in ways the real one
//! does not (an older version, one that is still starting): each request is answered by
//! a function of its request line, with a JSON body, and the connection closed.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves on a free local port until the test ends; returns its base URL. `answer` gets
/// each request's first line (`POST /worker/claims HTTP/1.1`) and gives the status line
/// (`404 Not Found`) and the body.
pub async fn stand_in_api(
    mut answer: impl FnMut(&str) -> (&'static str, String) + Send + 'static,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let request = read_request(&mut stream).await;
            let line = request.lines().next().unwrap_or_default().to_owned();
            let (status, body) = answer(&line);
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).await.ok();
            stream.shutdown().await.ok();
        }
    });
    url
}

/// The head, then as much body as Content-Length says (or what came before the peer
/// stopped sending).
async fn read_request(stream: &mut tokio::net::TcpStream) -> String {
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = stream.read(&mut buffer).await.unwrap_or(0);
        if read == 0 {
            break;
        }
        request.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&request);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                break;
            }
        }
    }
    String::from_utf8_lossy(&request).into_owned()
}
