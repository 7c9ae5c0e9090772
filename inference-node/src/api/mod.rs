//! The node's front: the HTTP server (`server`), the OpenAI request and
//! response types with their validation (`openai`), chat templates
//! (`chat`), tool calls (`tools`) and bodies read under a limit
//! (`http_body`).

pub mod chat;
pub mod http_body;
pub mod openai;
pub mod server;
pub mod tools;
