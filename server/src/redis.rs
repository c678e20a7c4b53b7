//! A small Redis client (RESP2 over TCP, blocking) for the shared job queue: commands as byte arguments, replies
//! as [`Reply`], connections pooled. Callers run it off the async threads (`spawn_blocking`) or for commands that
//! answer at once.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Nil,
    Int(i64),
    Bulk(Vec<u8>),
    Simple(String),
    Array(Vec<Reply>),
}

impl Reply {
    pub fn bytes(self) -> Option<Vec<u8>> {
        match self {
            Reply::Bulk(b) => Some(b),
            Reply::Simple(s) => Some(s.into_bytes()),
            _ => None,
        }
    }

    pub fn int(&self) -> i64 {
        match self {
            Reply::Int(i) => *i,
            Reply::Bulk(b) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn array(self) -> Vec<Reply> {
        match self {
            Reply::Array(a) => a,
            _ => Vec::new(),
        }
    }
}

struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    fn send(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let mut buf = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a);
            buf.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&buf)?;
        read_reply(&mut self.r)
    }
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

fn read_reply(r: &mut BufReader<TcpStream>) -> std::io::Result<Reply> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        return Err(bad("connection closed or malformed reply"));
    }
    let body = std::str::from_utf8(&line[1..line.len() - 2]).map_err(|_| bad("non-UTF-8 reply header"))?;
    let num = || body.parse::<i64>().map_err(|_| bad(format!("bad length `{body}`")));
    match line[0] {
        b'+' => Ok(Reply::Simple(body.to_string())),
        b'-' => Err(std::io::Error::other(format!("redis: {body}"))),
        b':' => Ok(Reply::Int(num()?)),
        b'$' => {
            let n = num()?;
            if n < 0 {
                return Ok(Reply::Nil);
            }
            let mut b = vec![0u8; n as usize + 2];
            r.read_exact(&mut b)?;
            b.truncate(n as usize);
            Ok(Reply::Bulk(b))
        }
        b'*' => {
            let n = num()?;
            if n < 0 {
                return Ok(Reply::Nil);
            }
            (0..n).map(|_| read_reply(r)).collect::<std::io::Result<Vec<_>>>().map(Reply::Array)
        }
        c => Err(bad(format!("unknown reply type `{}`", c as char))),
    }
}

/// A Redis server at `redis://HOST:PORT`, with a pool of idle connections.
pub struct Redis {
    addr: String,
    idle: Mutex<Vec<Conn>>,
}

impl Redis {
    /// Checks the URL and that the server answers PING.
    pub fn connect(url: &str) -> std::io::Result<Redis> {
        let addr = url
            .strip_prefix("redis://")
            .map(|a| a.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/') && !a.contains('@'))
            .ok_or_else(|| bad(format!("`{url}` is not redis://HOST:PORT")))?
            .to_string();
        let r = Redis { addr, idle: Mutex::new(Vec::new()) };
        match r.cmd(&[b"PING"]) {
            Ok(Reply::Simple(p)) if p == "PONG" => Ok(r),
            Ok(other) => Err(bad(format!("{url}: PING answered {other:?}"))),
            Err(e) => Err(std::io::Error::new(e.kind(), format!("{url}: {e}"))),
        }
    }

    fn open(&self) -> std::io::Result<Conn> {
        let w = TcpStream::connect(&self.addr)?;
        w.set_nodelay(true)?;
        w.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn { r: BufReader::new(w.try_clone()?), w })
    }

    /// Runs one command; a connection that failed is dropped, not returned to the pool.
    pub fn cmd(&self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let pooled = self.idle.lock().ok().and_then(|mut p| p.pop());
        let mut c = match pooled {
            Some(c) => c,
            None => self.open()?,
        };
        let r = c.send(args)?;
        if let Ok(mut p) = self.idle.lock()
            && p.len() < 16
        {
            p.push(c);
        }
        Ok(r)
    }
}
