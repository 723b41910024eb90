//! The rig's moto server is real SQS and S3 to the AWS SDK.
use std::time::Duration;

use pacer_tests::Rig;

#[tokio::test]
async fn sqs_send_receive_with_visibility_timeout_and_delete() {
    let rig = Rig::load();
    let sqs = rig.sqs().await;
    let name = Rig::unique("smoke");
    let url = rig.create_queue(&name).await;
    sqs.send_message()
        .queue_url(&url)
        .message_body("hello")
        .send()
        .await
        .expect("send");

    let got = sqs
        .receive_message()
        .queue_url(&url)
        .visibility_timeout(1)
        .wait_time_seconds(2)
        .send()
        .await
        .expect("receive");
    let msgs = got.messages.unwrap_or_default();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].body.as_deref(), Some("hello"));

    // Hidden while its visibility timeout runs ...
    let hidden = sqs
        .receive_message()
        .queue_url(&url)
        .send()
        .await
        .expect("receive");
    assert!(
        hidden.messages.unwrap_or_default().is_empty(),
        "message visible during its timeout"
    );
    // ... and back once it has passed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = sqs
        .receive_message()
        .queue_url(&url)
        .wait_time_seconds(2)
        .send()
        .await
        .expect("receive");
    let again = again.messages.unwrap_or_default();
    assert_eq!(
        again.len(),
        1,
        "message did not come back after its visibility timeout"
    );

    sqs.delete_message()
        .queue_url(&url)
        .receipt_handle(again[0].receipt_handle.clone().expect("receipt handle"))
        .send()
        .await
        .expect("delete");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let gone = sqs
        .receive_message()
        .queue_url(&url)
        .send()
        .await
        .expect("receive");
    assert!(
        gone.messages.unwrap_or_default().is_empty(),
        "deleted message came back"
    );
    sqs.delete_queue()
        .queue_url(&url)
        .send()
        .await
        .expect("delete queue");
}

#[tokio::test]
async fn s3_put_then_get() {
    let rig = Rig::load();
    let s3 = rig.s3().await;
    let bucket = Rig::unique("smoke");
    s3.create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create bucket on moto");
    let body = b"\x89PNG not really".to_vec();
    s3.put_object()
        .bucket(&bucket)
        .key("a/b.png")
        .content_type("image/png")
        .body(body.clone().into())
        .send()
        .await
        .expect("put");
    let got = s3
        .get_object()
        .bucket(&bucket)
        .key("a/b.png")
        .send()
        .await
        .expect("get");
    assert_eq!(got.content_type.as_deref(), Some("image/png"));
    let bytes = got.body.collect().await.expect("body").into_bytes();
    assert_eq!(bytes.as_ref(), body.as_slice());
}
